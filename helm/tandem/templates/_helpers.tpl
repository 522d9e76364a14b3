{{/* Names, labels and the image. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's objects. At most 40 characters: KubeRay appends suffixes to the RayService
name (`-xxxxx` for the cluster, `-serve-svc`, `-<group>-worker-xxxxx` for pods).
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Service KubeRay creates in front of the ready Serve proxies (port name `serve`). */}}
{{- define "tandem.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "tandem.fullname" .) -}}
{{- end -}}

{{/* Image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "tandem.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Where the API key hashes are mounted on every Ray pod, and the file the spec reads. */}}
{{- define "tandem.keysDir" -}}/etc/tandem/keys{{- end -}}
{{- define "tandem.keysFile" -}}{{ include "tandem.keysDir" . }}/keys.yaml{{- end -}}

{{/* The Secret of the key hashes: the chart's own when auth.keys are given, else auth.existingSecret. */}}
{{- define "tandem.keysSecretName" -}}
{{- if .Values.auth.keys -}}
{{- printf "%s-api-keys" (include "tandem.fullname" .) -}}
{{- else -}}
{{- .Values.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The key of that Secret that holds the list. */}}
{{- define "tandem.keysSecretKey" -}}
{{- ternary "keys.yaml" .Values.auth.existingSecretKey (not (empty .Values.auth.keys)) -}}
{{- end -}}

{{/*
The cache-salt secret ($TANDEM_SALT_SECRET of every Ray container): saltSecret.existingSecret, else the
chart's own Secret (templates/salt-secret.yaml), whose key is `secret`.
*/}}
{{- define "tandem.saltSecretEnv" -}}TANDEM_SALT_SECRET{{- end -}}
{{- define "tandem.saltSecretName" -}}
{{- .Values.saltSecret.existingSecret | default (printf "%s-salt" (include "tandem.fullname" .)) -}}
{{- end -}}
{{- define "tandem.saltSecretKey" -}}
{{- ternary .Values.saltSecret.existingSecretKey "secret" (ne .Values.saltSecret.existingSecret "") -}}
{{- end -}}

{{/*
head.numCpus as Ray gets it: the value, else (null) 0 when the spec has GPU worker groups and otherwise
the head container's CPU limit (or request), whole CPUs: Ray's --num-cpus takes an integer.
*/}}
{{- define "tandem.headNumCpus" -}}
{{- $n := .Values.head.numCpus -}}
{{- if not (kindIs "invalid" $n) -}}
{{- $n | toString -}}
{{- else if (fromYaml (include "tandem.gpuGroups" .)).groups -}}
0
{{- else -}}
{{- $res := .Values.head.resources | default dict -}}
{{- $cpu := dig "limits" "cpu" (dig "requests" "cpu" "" $res) $res | toString -}}
{{- if not $cpu -}}
{{- fail "head.numCpus is null and the head container has no CPU limit to take it from: set head.numCpus (the CPUs Ray may use on the head pod) or head.resources.limits.cpu" -}}
{{- end -}}
{{- if hasSuffix "m" $cpu -}}
{{- div (trimSuffix "m" $cpu | int) 1000 -}}
{{- else -}}
{{- $cpu | float64 | floor | int -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when KubeRay's in-tree autoscaler runs: autoscaler.enabled and worker groups to scale. */}}
{{- define "tandem.autoscalerEnabled" -}}
{{- if and .Values.autoscaler.enabled (fromYaml (include "tandem.gpuGroups" .)).groups -}}true{{- end -}}
{{- end -}}

{{/*
The prompt template library (templates.library, or templates.existingConfigMap): a ConfigMap mounted as a
directory on every Ray pod. Not a subPath mount: kubelet updates a directory mount in place (and never a
subPath one), and the ingress re-reads the file every tandem.templates.reload_interval_s, so a changed
library applies without a restart. Only the path goes into the spec (serveConfigV2); a change of the
library changes nothing else the RayService holds.
*/}}
{{- define "tandem.templatesDir" -}}/etc/tandem/templates{{- end -}}
{{- define "tandem.templatesFile" -}}{{ include "tandem.templatesDir" . }}/library.yaml{{- end -}}

{{/* "true" when the chart mounts a template library. */}}
{{- define "tandem.templatesEnabled" -}}
{{- if or .Values.templates.library .Values.templates.existingConfigMap -}}true{{- end -}}
{{- end -}}

{{- define "tandem.templatesConfigMapName" -}}
{{- .Values.templates.existingConfigMap | default (printf "%s-templates" (include "tandem.fullname" .)) -}}
{{- end -}}
