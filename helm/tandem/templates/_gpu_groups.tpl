{{/*
One Ray worker group per GPU pool of the spec (a pool whose accelerator is not `cpu`; never an
`engine: openai` pool, whose replicas are its upstream.endpoints outside the cluster's Ray pods, as
serving.replicas.placement leaves it out).

How pods map to replicas (the placement rules are serving/replicas/placement.py's):
- A pod is one node's worth of GPUs of the pool's accelerator: accelerators.<type>.gpusPerPod.
- A replica takes tp x pp GPUs (SGLang: tp x pp x dp, its DP ranks live in one engine); a vLLM pool with
  dp > 1 has dp replicas (ranks) per DP group, and `replicas` counts DP groups.
- The GPUs that must share a pod form a unit: a whole replica when pp = 1 (STRICT_PACK: tensor
  parallelism stays on one node), one pipeline stage (tp GPUs, SGLang tp x dp) when pp > 1 (PACK lets
  stages spill onto the next node).
- Pods = ceil(units / floor(gpusPerPod / unit GPUs)), computed at the pool's replicas.min, start
  (initial, else max(min, 1)) and max: the worker group's minReplicas, replicas and maxReplicas.
- Each pod advertises num-gpus = gpusPerPod and accelerator_type:<type> (the resource placement puts in
  every GPU bundle), so the Ray autoscaler can start a pod for a pending replica from zero.

The pool defaults below mirror serving/config.py (role colocated, engine vllm, accelerator cpu,
tp = pp = dp = 1, replicas min = max = 1, cpus_per_replica 1); tests/k8s compare with serving.replicas.placement.
*/}}
{{- define "tandem.gpuGroups" -}}
{{- $groups := list -}}
{{- $seen := dict -}}
{{- range $m := (get .Values.tandem "models" | default list) -}}
{{- range $p := (get $m "pools" | default list) -}}
{{- $acc := get $p "accelerator" | default "cpu" -}}
{{- /* An `engine: openai` pool is an external server the ingress calls over HTTP: no Ray replicas, no pods. */ -}}
{{- $external := eq (get $p "engine" | default "vllm") "openai" -}}
{{- if and (ne (lower $acc) "cpu") (not $external) -}}
{{- $pool := get $p "name" | default (get $p "role" | default "colocated") -}}
{{- $where := printf "tandem.models[%s].pools[%s]" $m.name $pool -}}
{{- $par := get $p "parallelism" | default dict -}}
{{- $tp := get $par "tp" | default 1 | int -}}
{{- $pp := get $par "pp" | default 1 | int -}}
{{- $dp := get $par "dp" | default 1 | int -}}
{{- $sglang := eq (get $p "engine" | default "vllm") "sglang" -}}
{{- $gpusPerReplica := mul $tp $pp (ternary $dp 1 $sglang) -}}
{{- $replicasPerGroup := ternary 1 $dp $sglang -}}
{{- $unitGpus := div $gpusPerReplica $pp -}}
{{- $reps := get $p "replicas" | default dict -}}
{{- $min := 1 -}}
{{- if hasKey $reps "min" -}}{{- $min = get $reps "min" | int -}}{{- end -}}
{{- $max := get $reps "max" | default 1 | int -}}
{{- $start := max $min 1 -}}
{{- if and (hasKey $reps "initial") (not (kindIs "invalid" (get $reps "initial"))) -}}
{{- $start = get $reps "initial" | int -}}
{{- end -}}
{{- $node := get $.Values.accelerators $acc -}}
{{- if not $node -}}
{{- fail (printf "%s runs on accelerator %s, but accelerators.%s is not set: give its gpusPerPod, cpu, memory and nodeSelector" $where $acc $acc) -}}
{{- end -}}
{{- $gpusPerPod := $node.gpusPerPod | int -}}
{{- $unitsPerPod := div $gpusPerPod $unitGpus -}}
{{- if lt $unitsPerPod 1 -}}
{{- fail (printf "%s needs %d GPUs on one node (parallelism tp=%d pp=%d dp=%d), but accelerators.%s.gpusPerPod is %d: raise gpusPerPod or split the replica with pp" $where $unitGpus $tp $pp $dp $acc $gpusPerPod) -}}
{{- end -}}
{{- $cpus := mulf $unitsPerPod (get $p "cpus_per_replica" | default 1.0) -}}
{{- if gt $cpus (float64 $node.cpu) -}}
{{- fail (printf "%s reserves %g CPUs for the %d replicas that fit one pod, but accelerators.%s.cpu is %v: raise cpu or lower cpus_per_replica" $where $cpus $unitsPerPod $acc $node.cpu) -}}
{{- end -}}
{{- $units := mul $replicasPerGroup $pp -}}
{{- $name := printf "%s-%s" $m.name $pool | lower | replace "." "-" | replace "_" "-" | trunc 50 | trimSuffix "-" -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "%s and %s both get the worker group name %s; rename one" (get $seen $name) $where $name) -}}
{{- end -}}
{{- $_ := set $seen $name $where -}}
{{- $groups = append $groups (dict
  "name" $name "model" $m.name "pool" $pool "accelerator" $acc
  "gpusPerPod" $gpusPerPod "gpusPerReplica" $gpusPerReplica
  "minReplicas" (div (add (mul $min $units) $unitsPerPod -1) $unitsPerPod)
  "replicas" (div (add (mul $start $units) $unitsPerPod -1) $unitsPerPod)
  "maxReplicas" (div (add (mul $max $units) $unitsPerPod -1) $unitsPerPod)
  "cpu" $node.cpu "memory" $node.memory
  "nodeSelector" ($node.nodeSelector | default dict)
  "tolerations" (concat $.Values.worker.tolerations ($node.tolerations | default list))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "groups" $groups) -}}
{{- end -}}
