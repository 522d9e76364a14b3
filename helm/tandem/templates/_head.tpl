{{/*
The head group: Ray's GCS, the dashboard, the Serve controller and a proxy; no GPUs. With head.numCpus > 0
(a CPU-only deployment) Serve replicas run here too, and so does the SQLite session store (state.dir).
*/}}
{{- define "tandem.headGroup" -}}
{{- $store := fromYaml (include "tandem.sessionStore" .) -}}
{{- $sqlite := and $store.enabled (eq $store.kind "sqlite") -}}
{{- $mounts := include "tandem.volumeMounts" . | trim -}}
{{- $volumes := include "tandem.volumes" . | trim -}}
rayStartParams:
  num-cpus: {{ include "tandem.headNumCpus" . | quote }}
  num-gpus: "0"
  dashboard-host: "0.0.0.0"
template:
  metadata:
    labels:
      {{- include "tandem.selectorLabels" . | nindent 6 }}
      app.kubernetes.io/component: ray-head
      {{- with .Values.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    {{- if not (include "tandem.autoscalerEnabled" .) }}
    # No autoscaler sidecar, so nothing on the head pod calls the Kubernetes API.
    automountServiceAccountToken: false
    {{- end }}
    {{- with include "tandem.podSpecCommon" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with .Values.head.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.head.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.head.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: ray-head
        image: {{ include "tandem.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        ports:
          - {name: gcs-server, containerPort: 6379}
          - {name: dashboard, containerPort: 8265}
          - {name: client, containerPort: 10001}
          - {name: serve, containerPort: {{ include "tandem.servePort" . }}}
          - {name: metrics, containerPort: 8080}
        resources:
          {{- toYaml .Values.head.resources | nindent 10 }}
        {{- with include "tandem.containerCommon" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if or $mounts $sqlite }}
        volumeMounts:
          {{- with $mounts }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- if $sqlite }}
          - {name: state, mountPath: {{ .Values.state.dir }}}
          {{- end }}
        {{- end }}
    {{- if or $volumes $sqlite }}
    volumes:
      {{- with $volumes }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- if $sqlite }}
      - name: state
        {{- if .Values.state.existingClaim }}
        persistentVolumeClaim: {claimName: {{ .Values.state.existingClaim }}}
        {{- else }}
        emptyDir: {}
        {{- end }}
      {{- end }}
    {{- end }}
{{- end -}}
