{{/* What every Ray pod (head and workers) shares: keys, the Redis URL, local models, extras. */}}

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
    {{- with .Values.containerSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* Container fields of every Ray container: env and security context. */}}
{{- define "tandem.containerCommon" -}}
{{- $store := fromYaml (include "tandem.sessionStore" .) -}}
{{- $redis := and $store.enabled (eq $store.kind "redis") $store.urlEnv -}}
{{- /* tandem.server.data_plane (serving.config.DataPlane; the default is tested equal to the spec's) */ -}}
{{- $plane := (((.Values.tandem).server).data_plane) | default "haproxy" -}}
{{- if not (has $plane (list "haproxy" "proxy")) -}}
{{- fail (printf "tandem.server.data_plane is %q: use haproxy (Ray Serve's HAProxy ingress and gRPC between replicas) or proxy (Ray Serve's Python HTTP proxy)" $plane) -}}
{{- end }}
env:
  # Ray Serve's data plane (tandem.server.data_plane), read when Serve starts on each pod.
  - name: RAY_SERVE_ENABLE_HA_PROXY
    value: {{ ternary "1" "0" (eq $plane "haproxy") | quote }}
  - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
    value: {{ ternary "1" "0" (eq $plane "haproxy") | quote }}
  # tandem.server.worker_niceness (Ray's default of 15 starves serving replicas of CPU).
  - name: RAY_worker_niceness
    value: {{ (((.Values.tandem).server).worker_niceness) | default 0 | quote }}
  {{- if $redis }}
  - name: {{ $store.urlEnv }}
    valueFrom:
      secretKeyRef:
        name: {{ required (printf "redis.existingSecret is required: tandem.sessions.store reads the Redis URL from $%s; create a Secret with the URL under key %q (kubectl create secret generic tandem-redis --from-literal=%s=redis://:PASSWORD@HOST:6379/0) and name it here" $store.urlEnv .Values.redis.existingSecretKey .Values.redis.existingSecretKey) .Values.redis.existingSecret }}
        key: {{ .Values.redis.existingSecretKey }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.containerSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tandem.volumeMounts" -}}
{{- if .Values.auth.enabled }}
- {name: api-keys, mountPath: {{ include "tandem.keysDir" . }}, readOnly: true}
{{- end }}
{{- if (fromYaml (include "tandem.localModels" .)).names }}
- {name: local-models, mountPath: {{ .Values.localModels.dir }}}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tandem.volumes" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "tandem.keysSecretName" . }}
    items:
      - key: {{ ternary .Values.auth.existingSecretKey "keys.yaml" (ne .Values.auth.existingSecret "") }}
        path: keys.yaml
{{- end }}
{{- if (fromYaml (include "tandem.localModels" .)).names }}
- name: local-models
  emptyDir: {}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
