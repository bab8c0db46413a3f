{{/* Names: at most 63 characters (DNS labels), without a trailing dash. */}}
{{- define "wasmfilter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wasmfilter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Component names; the suffix is kept, the prefix truncated. */}}
{{- define "wasmfilter.operator.fullname" -}}
{{- printf "%s-operator" (include "wasmfilter.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "wasmfilter.dataplane.fullname" -}}
{{- printf "%s-dataplane" (include "wasmfilter.fullname" . | trunc 53 | trimSuffix "-") -}}
{{- end -}}

{{- define "wasmfilter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kubernetes recommended labels. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "wasmfilter.labels" -}}
helm.sh/chart: {{ include "wasmfilter.chart" .ctx }}
{{ include "wasmfilter.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wasmfilter
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "wasmfilter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wasmfilter.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "wasmfilter.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "wasmfilter.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wasmfilter.dataplane.serviceAccountName" -}}
{{- if .Values.dataplane.serviceAccount.create -}}
{{- default (include "wasmfilter.dataplane.fullname" .) .Values.dataplane.serviceAccount.name -}}
{{- else -}}
{{- required "dataplane.serviceAccount.name is required when dataplane.serviceAccount.create is false" .Values.dataplane.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wasmfilter.operator.leaseName" -}}
{{- default (include "wasmfilter.operator.fullname" .) .Values.operator.leaseName -}}
{{- end -}}

{{/* Image reference. Call with (dict "image" .Values.operator.image "ctx" $). */}}
{{- define "wasmfilter.image" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry -}}
{{- $repo = printf "%s/%s" .image.registry .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secrets holding each side's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "wasmfilter.operator.tlsSecret" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- required "tls.existingSecret.operator is required when tls.mode is existingSecret" .Values.tls.existingSecret.operator -}}
{{- else -}}
{{- printf "%s-tls" (include "wasmfilter.operator.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "wasmfilter.dataplane.tlsSecret" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- default (include "wasmfilter.operator.tlsSecret" .) .Values.tls.existingSecret.dataplane -}}
{{- else -}}
{{- printf "%s-tls" (include "wasmfilter.dataplane.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* DNS names of the operator's gRPC Service: what its server certificate must cover. */}}
{{- define "wasmfilter.operator.dnsNames" -}}
{{- $svc := include "wasmfilter.operator.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- toJson (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain)) -}}
{{- end -}}

{{/* The address dataplanes dial. */}}
{{- define "wasmfilter.operator.address" -}}
{{- $scheme := ternary "http" "https" (eq .Values.tls.mode "disabled") -}}
{{- printf "%s://%s.%s.svc:%d" $scheme (include "wasmfilter.operator.fullname" .) .Release.Namespace (int .Values.operator.grpcPort) -}}
{{- end -}}
