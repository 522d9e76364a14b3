{{/* What every Ray pod (head and workers) shares: keys, the cache-salt secret, the Redis URL, upstream API
keys, local models, the template library, extras. */}}

{{/* Pod-level fields: pull secrets and, for `local:` models, the init container that builds them. */}}
{{- define "tandem.podSpecCommon" -}}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $local := (fromYaml (include "tandem.localModels" .)).names }}
{{- if $local }}
initContainers:
  - name: build-models
    image: {{ include "tandem.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - tandem
      - model
      - build
      - --dir
      - {{ .Values.localModels.dir }}
      {{- range $local }}
      - --name
      - {{ . }}
      {{- end }}
    volumeMounts:
      - {name: local-models, mountPath: {{ .Values.localModels.dir }}}
      {{- with include "tandem.writableMounts" . | trim }}
      {{- . | nindent 6 }}
      {{- end }}
    {{- with .Values.containerSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* Container fields of every Ray container: env and security context. */}}
{{- define "tandem.containerCommon" -}}
{{- include "tandem.checkUpstreamSecrets" . -}}
{{- $store := fromYaml (include "tandem.sessionStore" .) -}}
{{- $redis := and $store.enabled (eq $store.kind "redis") $store.urlEnv -}}
{{- /* tandem.server.data_plane (serving.config.DataPlane; the default is tested equal to the spec's) */ -}}
{{- $plane := (((.Values.tandem).server).data_plane) | default "haproxy" -}}
{{- range .Values.extraEnv -}}
{{- if eq (get . "name") (include "tandem.saltSecretEnv" $) -}}
{{- fail (printf "extraEnv sets %s, which the chart sets from saltSecret: name your Secret in saltSecret.existingSecret (and saltSecret.existingSecretKey) instead" (get . "name")) -}}
{{- end -}}
{{- end -}}
{{- if not (has $plane (list "haproxy" "proxy")) -}}
{{- fail (printf "tandem.server.data_plane is %q: use haproxy (Ray Serve's HAProxy ingress and gRPC between replicas) or proxy (Ray Serve's Python HTTP proxy)" $plane) -}}
{{- end }}
env:
  # Ray Serve's data plane (tandem.server.data_plane), read when Serve starts on each pod.
  - name: RAY_SERVE_ENABLE_HA_PROXY
    value: {{ ternary "1" "0" (eq $plane "haproxy") | quote }}
  - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
    value: {{ ternary "1" "0" (eq $plane "haproxy") | quote }}
  # Serve's own session header, moved off x-session-id (Tandem's; serving.config.SERVE_SESSION_HEADER_ENV).
  - name: RAY_SERVE_SESSION_ID_HEADER_KEY
    value: "x-ray-serve-session-id"
  # tandem.server.worker_niceness (Ray's default of 15 starves serving replicas of CPU).
  - name: RAY_worker_niceness
    value: {{ (((.Values.tandem).server).worker_niceness) | default 0 | quote }}
  # The cache-salt secret (router.hashing.salt_secret): the ingress salts each tenant's prefix-cache keys
  # with HMAC(secret, tenant); every Ray pod gets the same one, since an ingress replica may run on any.
  - name: {{ include "tandem.saltSecretEnv" . }}
    valueFrom:
      secretKeyRef:
        name: {{ include "tandem.saltSecretName" . }}
        key: {{ include "tandem.saltSecretKey" . }}
  {{- if $redis }}
  - name: {{ $store.urlEnv }}
    valueFrom:
      secretKeyRef:
        name: {{ required (printf "redis.existingSecret is required: tandem.sessions.store reads the Redis URL from $%s; create a Secret with the URL under key %q (kubectl create secret generic tandem-redis --from-literal=%s=redis://:PASSWORD@HOST:6379/0) and name it here" $store.urlEnv .Values.redis.existingSecretKey .Values.redis.existingSecretKey) .Values.redis.existingSecret }}
        key: {{ .Values.redis.existingSecretKey }}
  {{- end }}
  {{- range .Values.upstreamSecrets }}
  # The API key of an external server (tandem.models[].pools[].upstream.api_key_env).
  - name: {{ .env }}
    valueFrom:
      secretKeyRef:
        name: {{ .secretName }}
        key: {{ .secretKey }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.containerSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
writableDirs as the Ray containers get them: {name: path} without the dropped ones (null) and those an
extraVolumeMounts entry replaces (the same mountPath); a name an extraVolumes entry also has fails.
*/}}
{{- define "tandem.writableDirs" -}}
{{- $taken := list -}}
{{- range .Values.extraVolumeMounts -}}{{- $taken = append $taken (get . "mountPath") -}}{{- end -}}
{{- $names := list -}}
{{- range .Values.extraVolumes -}}{{- $names = append $names (get . "name") -}}{{- end -}}
{{- $dirs := dict -}}
{{- range $name, $path := .Values.writableDirs -}}
{{- if $path -}}
{{- if has $name $names -}}
{{- fail (printf "extraVolumes has a volume %s, the name of the writable directory writableDirs.%s (%s): rename yours, or mount it at %s to replace that directory" $name $name $path $path) -}}
{{- end -}}
{{- if not (has $path $taken) -}}
{{- $_ := set $dirs $name $path -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "dirs" $dirs) -}}
{{- end -}}

{{/* Mounts of the writable directories, parents before what they hold (by path). */}}
{{- define "tandem.writableMounts" -}}
{{- $dirs := (fromYaml (include "tandem.writableDirs" .)).dirs | default dict -}}
{{- $byPath := dict -}}
{{- range $name, $path := $dirs -}}{{- $_ := set $byPath $path $name -}}{{- end -}}
{{- range $path := keys $byPath | sortAlpha }}
- {name: {{ get $byPath $path }}, mountPath: {{ $path }}}
{{- end }}
{{- end -}}

{{- define "tandem.volumeMounts" -}}
{{ include "tandem.writableMounts" . }}
{{- if .Values.auth.enabled }}
- {name: api-keys, mountPath: {{ include "tandem.keysDir" . }}, readOnly: true}
{{- end }}
{{- if (fromYaml (include "tandem.localModels" .)).names }}
- {name: local-models, mountPath: {{ .Values.localModels.dir }}}
{{- end }}
{{- if include "tandem.templatesEnabled" . }}
{{- /* The whole directory, never a subPath: kubelet does not update a subPath mount. */}}
- {name: templates, mountPath: {{ include "tandem.templatesDir" . }}, readOnly: true}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tandem.volumes" -}}
{{- range $name := keys ((fromYaml (include "tandem.writableDirs" .)).dirs | default dict) | sortAlpha }}
- name: {{ $name }}
  emptyDir: {}
{{- end }}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "tandem.keysSecretName" . }}
    items:
      - key: {{ include "tandem.keysSecretKey" . }}
        path: keys.yaml
{{- end }}
{{- if (fromYaml (include "tandem.localModels" .)).names }}
- name: local-models
  emptyDir: {}
{{- end }}
{{- if include "tandem.templatesEnabled" . }}
- name: templates
  configMap:
    name: {{ include "tandem.templatesConfigMapName" . }}
    items:
      - key: {{ ternary .Values.templates.existingConfigMapKey "library.yaml" (ne .Values.templates.existingConfigMap "") }}
        path: library.yaml
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The `engine: openai` pools' upstream.api_key_env variables, as a list of {env, where}. The ingress calls the
external servers, and it may run on any Ray pod, so each variable must be set on every Ray container.
*/}}
{{- define "tandem.upstreamKeyEnvs" -}}
{{- $found := list -}}
{{- range $m := (get .Values.tandem "models" | default list) -}}
{{- range $p := (get $m "pools" | default list) -}}
{{- $upstream := get $p "upstream" | default dict -}}
{{- if and (eq (get $p "engine" | default "vllm") "openai") (get $upstream "api_key_env") -}}
{{- $pool := get $p "name" | default (get $p "role" | default "colocated") -}}
{{- $found = append $found (dict "env" $upstream.api_key_env "where" (printf "tandem.models[%s].pools[%s]" $m.name $pool)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "envs" $found) -}}
{{- end -}}

{{/* Fails unless every upstream.api_key_env comes from upstreamSecrets (or extraEnv), each set once. */}}
{{- define "tandem.checkUpstreamSecrets" -}}
{{- $secrets := list -}}
{{- range .Values.upstreamSecrets -}}
{{- if has .env $secrets -}}
{{- fail (printf "upstreamSecrets names %s twice; give each variable one entry" .env) -}}
{{- end -}}
{{- $secrets = append $secrets .env -}}
{{- end -}}
{{- $extra := list -}}
{{- range .Values.extraEnv -}}{{- $extra = append $extra (get . "name") -}}{{- end -}}
{{- range $secrets -}}
{{- if has . $extra -}}
{{- fail (printf "%s is set by both upstreamSecrets and extraEnv; keep one" .) -}}
{{- end -}}
{{- end -}}
{{- range (fromYaml (include "tandem.upstreamKeyEnvs" .)).envs -}}
{{- if not (or (has .env $secrets) (has .env $extra)) -}}
{{- fail (printf "%s.upstream.api_key_env is %s, but no Secret sets it on the Ray pods: create one (kubectl create secret generic upstream-key --from-literal=api-key=KEY) and add {env: %s, secretName: upstream-key, secretKey: api-key} to upstreamSecrets (or set %s in extraEnv)" .where .env .env .env) -}}
{{- end -}}
{{- end -}}
{{- end -}}
