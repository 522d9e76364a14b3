{{/*
The load test (`loadtest.enabled`): a Locust master (a Job running `python -m loadtests run`) and
`loadtest.workers` Locust workers (a Deployment) next to the RayService, driven by the workload file
in a ConfigMap. Everything here is used only when loadtest.enabled is true.
*/}}

{{/* Locust's master port (the workers connect to it; `--master-bind-port`). */}}
{{- define "tandem.loadtest.masterPort" -}}5557{{- end -}}
{{- define "tandem.loadtest.workloadDir" -}}/etc/tandem-loadtest{{- end -}}
{{- define "tandem.loadtest.workloadFile" -}}{{ include "tandem.loadtest.workloadDir" . }}/workload.yaml{{- end -}}
{{/* Where the workers build the default tokenizer (the tiny-intent model) when the workload names none. */}}
{{- define "tandem.loadtest.modelDir" -}}/var/lib/tandem-loadtest/models{{- end -}}

{{- define "tandem.loadtest.name" -}}
{{- printf "%s-loadtest" (include "tandem.fullname" .) -}}
{{- end -}}

{{- define "tandem.loadtest.masterServiceName" -}}
{{- printf "%s-loadtest-master" (include "tandem.fullname" .) -}}
{{- end -}}

{{/* Labels of a load-test pod (`component` is master or worker): the release's, and its component. */}}
{{- define "tandem.loadtest.selectorLabels" -}}
{{ include "tandem.selectorLabels" .root }}
app.kubernetes.io/component: loadtest-{{ .component }}
{{- end -}}

{{/* Tandem's URL: loadtest.host, else this release's Serve Service (KubeRay's `<fullname>-serve-svc`). */}}
{{- define "tandem.loadtest.host" -}}
{{- .Values.loadtest.host | default (printf "http://%s:%s" (include "tandem.serveServiceName" .) (include "tandem.servePort" .)) -}}
{{- end -}}

{{/* loadtest.image, else the chart's image. */}}
{{- define "tandem.loadtest.image" -}}
{{- $img := .Values.loadtest.image -}}
{{- if not $img.repository -}}
{{- include "tandem.image" . -}}
{{- else if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository ($img.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The workload's duration_s (the parser's default when unset). */}}
{{- define "tandem.loadtest.durationSeconds" -}}
{{- $d := get .Values.loadtest.workload "duration_s" -}}
{{- if kindIs "invalid" $d -}}60{{- else -}}{{ ceil $d | int }}{{- end -}}
{{- end -}}

{{/*
The Job's activeDeadlineSeconds: loadtest.activeDeadlineSeconds, else the run (duration_s) plus 900 s
(image pulls, the workers' tokenizer, their connecting, Locust's drain and the report) plus
results.keepSeconds.
*/}}
{{- define "tandem.loadtest.deadline" -}}
{{- $lt := .Values.loadtest -}}
{{- $run := add (include "tandem.loadtest.durationSeconds" . | int) (int $lt.results.keepSeconds) -}}
{{- if $lt.activeDeadlineSeconds -}}
{{- if le (int $lt.activeDeadlineSeconds) $run -}}
{{- fail (printf "loadtest.activeDeadlineSeconds is %d, but the workload's duration_s plus loadtest.results.keepSeconds is %d: the Job would be stopped before it ends. Raise it, or leave it 0 to derive it (duration_s + 900 + keepSeconds)" (int $lt.activeDeadlineSeconds) $run) -}}
{{- end -}}
{{- $lt.activeDeadlineSeconds | int -}}
{{- else -}}
{{- add $run 900 -}}
{{- end -}}
{{- end -}}

{{/* Where the master writes the report: the emptyDir itself, or one directory per run (Job) on a claim. */}}
{{- define "tandem.loadtest.outDir" -}}
{{- if .Values.loadtest.results.existingClaim -}}
/results/{{ include "tandem.loadtest.jobName" . }}
{{- else -}}
/results
{{- end -}}
{{- end -}}

{{/*
The workload file as deployed: loadtest.workload, checked, with `api_key_env` set to TANDEM_API_KEY when
loadtest.apiKeySecret names a Secret and the workload names no variable.
*/}}
{{- define "tandem.loadtest.workload" -}}
{{- $lt := .Values.loadtest -}}
{{- $wl := deepCopy ($lt.workload | default dict) -}}
{{- if not (kindIs "map" (get $wl "shape")) -}}
{{- fail "loadtest.workload.shape is required: the offered load, e.g. {kind: poisson, rate: 2} (see loadtests/workload.py)" -}}
{{- end -}}
{{- $workloads := get $wl "workloads" -}}
{{- if not (and (kindIs "slice" $workloads) $workloads) -}}
{{- fail "loadtest.workload.workloads is required: list the request types and their weights, e.g. [{type: intent, weight: 3}, {type: agent, weight: 1}] (see loadtests/workload.py)" -}}
{{- end -}}
{{- if $lt.apiKeySecret.name -}}
{{- if not (get $wl "api_key_env") -}}
{{- $_ := set $wl "api_key_env" "TANDEM_API_KEY" -}}
{{- end -}}
{{- else if get $wl "api_key_env" -}}
{{- fail (printf "loadtest.workload.api_key_env is %s, but loadtest.apiKeySecret.name is empty: name the Secret that holds the API key (the chart sets $%s from it)" (get $wl "api_key_env") (get $wl "api_key_env")) -}}
{{- else if .Values.auth.enabled -}}
{{- fail "loadtest.apiKeySecret.name is required when auth.enabled is true: the load test calls the API with a key. Create a Secret holding one (kubectl create secret generic tandem-loadtest-key --from-literal=api-key=KEY) and name it here" -}}
{{- end -}}
{{- toYaml $wl -}}
{{- end -}}

{{/* Checks of the load-test values that the schema cannot make. */}}
{{- define "tandem.loadtest.validate" -}}
{{- $lt := .Values.loadtest -}}
{{- if lt (int $lt.workers) 1 -}}
{{- fail (printf "loadtest.workers is %d: the Locust master waits for that many workers; give at least 1" (int $lt.workers)) -}}
{{- end -}}
{{- $_ := include "tandem.loadtest.workload" . -}}
{{- $_ := include "tandem.loadtest.deadline" . -}}
{{- end -}}

{{/*
Environment of every load-test container: HOME on the /tmp emptyDir (the root filesystem is read-only;
matplotlib's and Hugging Face's caches go under HOME).
*/}}
{{- define "tandem.loadtest.baseEnv" -}}
- {name: PYTHONDONTWRITEBYTECODE, value: "1"}
- {name: HOME, value: /tmp}
{{- end -}}

{{/* Environment of the master and the workers: the above, and the API key from its Secret. */}}
{{- define "tandem.loadtest.env" -}}
{{- $wl := fromYaml (include "tandem.loadtest.workload" .) -}}
{{ include "tandem.loadtest.baseEnv" . }}
{{- with .Values.loadtest.apiKeySecret.name }}
- name: {{ $wl.api_key_env }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.loadtest.apiKeySecret.key }}
{{- end }}
{{- end -}}

{{/* Pod fields of both load-test pods. */}}
{{- define "tandem.loadtest.podCommon" -}}
{{- $lt := .Values.loadtest -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml $lt.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $lt.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $lt.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $lt.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Volume mounts of both load-test containers: the workload (read-only), /tmp, extras. */}}
{{- define "tandem.loadtest.volumeMounts" -}}
- {name: workload, mountPath: {{ include "tandem.loadtest.workloadDir" . }}, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- with .Values.loadtest.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tandem.loadtest.volumes" -}}
- name: workload
  configMap:
    name: {{ include "tandem.loadtest.name" . }}
- name: tmp
  emptyDir: {}
{{- with .Values.loadtest.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The master Job's spec (`out`: the report's directory). The pod template of a Job cannot be changed, so
the Job's name carries a hash of this spec (tandem.loadtest.jobName): changed load-test values make a new
Job, a new run, on upgrade.
*/}}
{{- define "tandem.loadtest.jobSpec" -}}
{{- $out := .out -}}
{{- with .root -}}
{{- $lt := .Values.loadtest -}}
{{- $keep := int $lt.results.keepSeconds -}}
backoffLimit: 0
activeDeadlineSeconds: {{ include "tandem.loadtest.deadline" . }}
{{- if not (kindIs "invalid" $lt.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ $lt.ttlSecondsAfterFinished | int }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "tandem.loadtest.selectorLabels" (dict "root" . "component" "master") | nindent 6 }}
    annotations:
      checksum/workload: {{ include "tandem.loadtest.workload" . | sha256sum }}
  spec:
    restartPolicy: Never
    {{- include "tandem.loadtest.podCommon" . | nindent 4 }}
    containers:
      - name: master
        image: {{ include "tandem.loadtest.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        workingDir: {{ $lt.workingDir }}
        # Runs its arguments; then keeps the pod (and the report under {{ $out }}) for
        # loadtest.results.keepSeconds so that `kubectl cp` can read it, and exits with their status. A
        # SIGTERM (the Job deleted) is passed on, and then nothing is kept.
        command:
          - sh
          - -c
          - |
            "$@" &
            child=$!
            trap 'stopped=1; kill -TERM "$child" 2>/dev/null' TERM INT
            wait "$child"; rc=$?
            while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
            [ -z "${stopped:-}" ] || exit "$rc"
            echo "loadtest: exited $rc; the report is in {{ $out }} (kept here for {{ $keep }} s)"
            trap 'exit "$rc"' TERM INT
            sleep {{ $keep }} & wait $!
            exit "$rc"
          - loadtest-master
        args:
          - python
          - -m
          - loadtests
          - run
          - --workload
          - {{ include "tandem.loadtest.workloadFile" . }}
          - --host
          - {{ include "tandem.loadtest.host" . }}
          - --out
          - {{ $out }}
          - --expect-workers
          - {{ $lt.workers | int | quote }}
          - --master-bind-port
          - {{ include "tandem.loadtest.masterPort" . | quote }}
          # Tandem may still be starting (a fresh install): wait for it rather than fail the Job.
          - --wait-s
          - "900"
        ports:
          - {name: locust, containerPort: {{ include "tandem.loadtest.masterPort" . }}, protocol: TCP}
        env:
          {{- include "tandem.loadtest.env" . | nindent 10 }}
        resources:
          {{- toYaml $lt.resources.master | nindent 10 }}
        securityContext:
          {{- toYaml $lt.containerSecurityContext | nindent 10 }}
        volumeMounts:
          {{- include "tandem.loadtest.volumeMounts" . | nindent 10 }}
          - {name: results, mountPath: /results}
    volumes:
      {{- include "tandem.loadtest.volumes" . | nindent 6 }}
      - name: results
        {{- if $lt.results.existingClaim }}
        persistentVolumeClaim: {claimName: {{ $lt.results.existingClaim }}}
        {{- else }}
        emptyDir: {}
        {{- end }}
{{- end -}}
{{- end -}}

{{/* `<fullname>-loadtest-<hash of the Job's spec>` (hashed with a stand-in for the report directory). */}}
{{- define "tandem.loadtest.jobName" -}}
{{- $spec := include "tandem.loadtest.jobSpec" (dict "root" . "out" "/results/RUN") -}}
{{- printf "%s-%s" (include "tandem.loadtest.name" .) ($spec | sha256sum | trunc 8) -}}
{{- end -}}
