{{/*
The Tandem spec as deployed, and the Ray Serve config that carries it.

A few ServingSpec defaults (serving/config.py) are repeated here because the chart sizes pods and
volumes from them: server.port 8000, sessions.enabled true, sessions.store.kind sqlite, and the pool
defaults in _gpu_groups.tpl. tests/k8s render the chart and compare with serving.config / serving.replicas.placement,
so a drift fails a test.
*/}}

{{- define "tandem.servePort" -}}
{{- dig "server" "port" 8000 .Values.tandem | int -}}
{{- end -}}

{{/* The session store as the chart needs it: {enabled, kind, urlEnv}. */}}
{{- define "tandem.sessionStore" -}}
{{- $store := dig "sessions" "store" dict .Values.tandem -}}
enabled: {{ dig "sessions" "enabled" true .Values.tandem }}
kind: {{ get $store "kind" | default "sqlite" }}
urlEnv: {{ get $store "url_env" | default "" | quote }}
{{- end -}}

{{/* Names of the spec's `local:<name>` models (built in the pod by an init container). */}}
{{- define "tandem.localModels" -}}
{{- $names := list -}}
{{- range $m := (get .Values.tandem "models" | default list) -}}
{{- $source := get $m "source" | default "" -}}
{{- if hasPrefix "local:" $source -}}
{{- $names = append $names (trimPrefix "local:" $source) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "names" ($names | uniq)) -}}
{{- end -}}

{{/*
.Values.tandem plus what the chart owns: the API listens on 0.0.0.0, auth reads the mounted keys file,
templates.library_file is the mounted template library (with templates.library or existingConfigMap),
and (when not set) local models and the SQLite session store live on the chart's volumes.
*/}}
{{- define "tandem.spec" -}}
{{- $spec := deepCopy .Values.tandem -}}
{{- /* values.yaml's default models stay unless a values file gives tandem.models: tiers of your own next to them would name models they lack. */ -}}
{{- $models := list -}}
{{- range (get $spec "models" | default list) -}}{{- $models = append $models (get . "name") -}}{{- end -}}
{{- range (get $spec "tiers" | default list) -}}
{{- if not (has (get . "model") $models) -}}
{{- fail (printf "tandem.tiers[%s].model is %v, but tandem.models has %s: name one of them, or give tandem.models with your tiers (without it the spec keeps the chart's default model, tiny-intent)" (get . "name") (get . "model") (toJson $models)) -}}
{{- end -}}
{{- end -}}
{{- $server := get $spec "server" | default dict -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $spec "server" $server -}}
{{- if .Values.auth.enabled -}}
{{- if not (or .Values.auth.keys .Values.auth.existingSecret) -}}
{{- fail "auth.keys (or auth.existingSecret) is required when auth.enabled is true: run `tandem key new --tenant NAME` and put the {tenant, sha256} entries here (or name a Secret holding them in auth.existingSecret)" -}}
{{- end -}}
{{- $_ := set $spec "auth" (dict "enabled" true "keys_file" (include "tandem.keysFile" .)) -}}
{{- else if .Values.auth.allowRemoteUnauthenticated -}}
{{- $_ := set $spec "auth" (dict "enabled" false "allow_remote_unauthenticated" true) -}}
{{- else -}}
{{- fail "auth.enabled is false: the API would be open to anyone on the pod network. Keep auth on (auth.keys or auth.existingSecret), or set auth.allowRemoteUnauthenticated: true" -}}
{{- end -}}
{{- if and (fromYaml (include "tandem.localModels" .)).names (not (hasKey $spec "model_dir")) -}}
{{- $_ := set $spec "model_dir" .Values.localModels.dir -}}
{{- end -}}
{{- $templates := get $spec "templates" | default dict -}}
{{- if hasKey $templates "library_file" -}}
{{- fail "tandem.templates.library_file is set by the chart: put the library in templates.library (a ConfigMap the chart mounts at /etc/tandem/templates, reloaded without a restart) or name your own ConfigMap in templates.existingConfigMap" -}}
{{- end -}}
{{- if include "tandem.templatesEnabled" . -}}
{{- if and .Values.templates.library .Values.templates.existingConfigMap -}}
{{- fail "templates.library and templates.existingConfigMap are both set: give the library inline (the chart makes the ConfigMap) or name your own ConfigMap, not both" -}}
{{- end -}}
{{- if get $templates "library" -}}
{{- fail "tandem.templates.library and the chart's templates.library (or templates.existingConfigMap) are both set, and the mounted file would replace the inline library: keep the library in templates.library only (it reloads without a restart; tandem.templates.library goes into serveConfigV2, and a change of it redeploys the application)" -}}
{{- end -}}
{{- if not .Values.templates.existingConfigMap -}}
{{- include "tandem.checkTemplateLibrary" . -}}
{{- end -}}
{{- $_ := set $templates "library_file" (include "tandem.templatesFile" .) -}}
{{- $_ := set $spec "templates" $templates -}}
{{- end -}}
{{- $store := fromYaml (include "tandem.sessionStore" .) -}}
{{- if and $store.enabled (eq $store.kind "sqlite") -}}
{{- $sessions := get $spec "sessions" | default dict -}}
{{- $sqlite := get $sessions "store" | default dict -}}
{{- if not (hasKey $sqlite "path") -}}
{{- $_ := set $sqlite "path" (printf "%s/sessions.db" .Values.state.dir) -}}
{{- $_ := set $sessions "store" $sqlite -}}
{{- $_ := set $spec "sessions" $sessions -}}
{{- end -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/*
Checks of templates.library that its schema (TemplateLibrarySpec) cannot express, as serving.config and
serving.http.templates.parse_library make them (tests/k8s compare): each template has a system prompt or
few-shot pairs, no name@version twice, each binding names a template of the library and at least one of
tier, task or tenant, and its tier and task are the spec's. The ingress checks the same on every reload; a
values file that fails here would be refused there and the library left empty.
*/}}
{{- define "tandem.checkTemplateLibrary" -}}
{{- $lib := .Values.templates.library -}}
{{- $tiers := list -}}
{{- range (get .Values.tandem "tiers" | default list) -}}{{- $tiers = append $tiers .name -}}{{- end -}}
{{- $tasks := list -}}
{{- range (dig "routing" "tasks" list .Values.tandem) -}}{{- $tasks = append $tasks .name -}}{{- end -}}
{{- $refs := list -}}
{{- $names := list -}}
{{- range $i, $t := (get $lib "templates" | default list) -}}
{{- $ref := printf "%s@%v" $t.name (get $t "version" | default 1) -}}
{{- if has $ref $refs -}}
{{- fail (printf "templates.library.templates[%d]: %s is defined twice; give each name@version once" $i $ref) -}}
{{- end -}}
{{- $refs = append $refs $ref -}}
{{- $names = append $names $t.name -}}
{{- $turns := get $t "few_shot" | default list -}}
{{- if and (not (get $t "system")) (not $turns) (ne (get $t "inject" | default "if_missing") "never") -}}
{{- fail (printf "templates.library.templates[%d] (%s): a template needs a system prompt or few-shot turns (or inject: never)" $i $ref) -}}
{{- end -}}
{{- range $j, $turn := $turns -}}
{{- if ne $turn.role (ternary "user" "assistant" (eq (mod $j 2) 0)) -}}
{{- fail (printf "templates.library.templates[%d].few_shot (%s): user/assistant pairs, starting with user" $i $ref) -}}
{{- end -}}
{{- end -}}
{{- if mod (len $turns) 2 -}}
{{- fail (printf "templates.library.templates[%d].few_shot (%s): user/assistant pairs, starting with user" $i $ref) -}}
{{- end -}}
{{- end -}}
{{- range $i, $b := (get $lib "bindings" | default list) -}}
{{- if not (or (get $b "tier") (get $b "task") (get $b "tenant")) -}}
{{- fail (printf "templates.library.bindings[%d]: a binding needs at least one of tier, task or tenant" $i) -}}
{{- end -}}
{{- $tmpl := get $b "template" | default "" -}}
{{- if and (ne $tmpl "none") (not (has $tmpl $refs)) (or (contains "@" $tmpl) (not (has $tmpl $names))) -}}
{{- fail (printf "templates.library.bindings[%d].template: %q is not in the library; choose from %s" $i $tmpl (toJson ($refs | sortAlpha))) -}}
{{- end -}}
{{- with get $b "tier" -}}
{{- if not (has . $tiers) -}}
{{- fail (printf "templates.library.bindings[%d].tier: unknown tier %q; choose from tandem.tiers %s" $i . (toJson $tiers)) -}}
{{- end -}}
{{- end -}}
{{- with get $b "task" -}}
{{- if not (has . $tasks) -}}
{{- fail (printf "templates.library.bindings[%d].task: unknown task type %q; choose from tandem.routing.tasks %s" $i . (toJson $tasks)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when a pool of the spec is autoscaled (replicas.min < replicas.max; both default to 1). */}}
{{- define "tandem.autoscaled" -}}
{{- $any := false -}}
{{- range $m := (get .Values.tandem "models" | default list) -}}
{{- range $p := (get $m "pools" | default list) -}}
{{- $r := get $p "replicas" | default dict -}}
{{- if lt (int (get $r "min" | default 1)) (int (get $r "max" | default 1)) -}}
{{- $any = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $any -}}
{{- end -}}

{{/*
serveConfigV2: one application, `serving.app:build_app` with the spec inline. With autoscaled pools,
Tandem's SLO autoscaler is the application's autoscaling policy (serving/autoscaling.py, as
serving.autoscaling.serve_config writes it), with the same spec.
*/}}
{{- define "tandem.serveConfig" -}}
{{- $app := dict "name" "tandem" "route_prefix" "/" "import_path" "serving.app:build_app" -}}
{{- $spec := fromYaml (include "tandem.spec" .) -}}
{{- $_ := set $app "args" (dict "spec" $spec) -}}
{{- if eq (include "tandem.autoscaled" .) "true" -}}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" "serving.autoscaling:TandemAutoscalingPolicy" "policy_kwargs" (dict "spec" $spec)) -}}
{{- end -}}
{{- $http := dict "host" "0.0.0.0" "port" (include "tandem.servePort" . | int) -}}
{{- toYaml (dict "http_options" $http "applications" (list $app)) -}}
{{- end -}}
