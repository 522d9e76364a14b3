{{/* The worker group object of one GPU pool (sized in _gpu_groups.tpl). */}}

{{/* A worker group of the RayService; the argument is (dict "root" $ "group" <one of tandem.gpuGroups>). */}}
{{- define "tandem.workerGroup" -}}
{{- $g := .group -}}
{{- with .root -}}
- groupName: {{ $g.name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    num-gpus: {{ $g.gpusPerPod | quote }}
    resources: {{ printf "\"{\\\"accelerator_type:%s\\\": 1}\"" $g.accelerator | squote }}
  template:
    metadata:
      labels:
        {{- include "tandem.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: ray-worker
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      # Nothing on a worker pod calls the Kubernetes API (the autoscaler runs on the head).
      automountServiceAccountToken: false
      {{- with include "tandem.podSpecCommon" . | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      nodeSelector:
        {{- toYaml $g.nodeSelector | nindent 8 }}
      tolerations:
        {{- toYaml $g.tolerations | nindent 8 }}
      {{- with .Values.worker.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "tandem.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - {name: serve, containerPort: {{ include "tandem.servePort" . }}}
            - {name: metrics, containerPort: 8080}
          {{- $res := dict "cpu" ($g.cpu | toString) "memory" $g.memory .Values.worker.gpuResource ($g.gpusPerPod | toString) }}
          resources:
            requests:
              {{- toYaml $res | nindent 14 }}
            limits:
              {{- toYaml $res | nindent 14 }}
          {{- with include "tandem.containerCommon" . | trim }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with include "tandem.volumeMounts" . | trim }}
          volumeMounts:
            {{- . | nindent 12 }}
          {{- end }}
      {{- with include "tandem.volumes" . | trim }}
      volumes:
        {{- . | nindent 8 }}
      {{- end }}
{{- end -}}
{{- end -}}
