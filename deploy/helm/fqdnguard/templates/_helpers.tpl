{{/* The objects' name: the release's, unless it lacks the chart's name. */}}
{{- define "fqdnguard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fqdnguard.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fqdnguard.labels" -}}
{{ include "fqdnguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fqdnguard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* dnsProxy.proxyResponseMaxDelay (a Go-style duration: 100ms, 1s, 1.5s) in seconds. */}}
{{- define "fqdnguard.holdMax" -}}
{{- $d := toString .Values.dnsProxy.proxyResponseMaxDelay -}}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?ms$" $d -}}
{{- divf (trimSuffix "ms" $d | float64) 1000 -}}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?s$" $d -}}
{{- trimSuffix "s" $d | float64 -}}
{{- else -}}
{{- fail (printf "dnsProxy.proxyResponseMaxDelay: %q is not a duration such as 100ms or 1s" $d) -}}
{{- end -}}
{{- end -}}

{{/* The reject code: Cilium's names (refused, nameError) to fqdnguard's (refused, nxdomain). */}}
{{- define "fqdnguard.reject" -}}
{{- $code := .Values.dnsProxy.dnsRejectResponseCode -}}
{{- if eq $code "refused" -}}refused
{{- else if eq $code "nameError" -}}nxdomain
{{- else -}}
{{- fail (printf "dnsProxy.dnsRejectResponseCode: %q must be refused or nameError" $code) -}}
{{- end -}}
{{- end -}}

{{/* Where the pod-private control socket lives (an emptyDir): each pod's agent and probes reach
their own pod's proxy, never the other pod's during an upgrade. */}}
{{- define "fqdnguard.runDir" -}}/run/fqdnguard{{- end -}}
{{- define "fqdnguard.socket" -}}{{ include "fqdnguard.runDir" . }}/control.sock{{- end -}}
