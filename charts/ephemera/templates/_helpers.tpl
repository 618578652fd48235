{{/* The chart's name in labels: nameOverride, else "ephemera". */}}
{{- define "ephemera.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object's name: fullnameOverride; else the release's name when it holds the chart's
name (nameOverride counts), else both. 50 characters at most; names longer than a suffix allows are
cut to 63 where they are made (ephemera.metricsName).
*/}}
{{- define "ephemera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{ .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else -}}
{{- $name := include "ephemera.name" . -}}
{{- if contains $name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The metrics Service of a component ("operator", "webhook"), within a Service name's 63 characters. */}}
{{- define "ephemera.metricsName" -}}
{{- printf "%s-%s-metrics" (include "ephemera.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ephemera.labels" -}}
app.kubernetes.io/name: {{ include "ephemera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ephemera.selector" -}}
app.kubernetes.io/name: {{ include "ephemera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ephemera.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ephemera.secretName" -}}
{{ .Values.secrets.existingSecret | default (printf "%s-secrets" (include "ephemera.fullname" .)) }}
{{- end -}}

{{/* A secret-backed variable, optional so that a missing key leaves the setting unset. */}}
{{- define "ephemera.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ephemera.secretName" .root }}
      key: {{ .key }}
      optional: true
{{- end -}}

{{- define "ephemera.commonEnv" -}}
- name: EPHEMERA_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: EPHEMERA_NAMESPACE_PREFIX
  value: {{ .Values.config.namespacePrefix | quote }}
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ include "ephemera.envValue" $value }}
{{- end }}
{{- end -}}

{{- define "ephemera.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "ephemera.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}


{{/*
An environment variable's value, quoted. YAML numbers reach templates as float64, which print in
exponent form from 7 digits on ("1.048576e+07"), and the settings refuse that for an integer: whole
numbers are rendered as integers. Strings (an app id given as "0123") are kept as they are.
*/}}
{{- define "ephemera.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{ int64 . | toString | quote }}
{{- else -}}
{{ . | toString | quote }}
{{- end -}}
{{- end -}}

{{/* A ServiceMonitor's or PodMonitor's endpoint settings from its values. */}}
{{- define "ephemera.scrapeSettings" -}}
interval: {{ .interval }}
scrapeTimeout: {{ .scrapeTimeout }}
{{- with .relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The policy (which PRs get a preview): the webhook and the operator's backstop judge alike. */}}
{{- define "ephemera.policyEnv" -}}
{{- with .Values.previewPolicy }}
- {name: EPHEMERA_POLICY_ALLOW, value: {{ .allow | toJson | quote }}}
- {name: EPHEMERA_POLICY_BOT_AUTHORS, value: {{ .botAuthors | toJson | quote }}}
- {name: EPHEMERA_POLICY_SKIP_ALL_BOTS, value: {{ .skipAllBots | quote }}}
- {name: EPHEMERA_POLICY_OPT_IN, value: {{ .optIn | quote }}}
- {name: EPHEMERA_POLICY_OPT_IN_LABEL, value: {{ .optInLabel | quote }}}
- {name: EPHEMERA_POLICY_FORKS, value: {{ .forks | quote }}}
- {name: EPHEMERA_POLICY_APPROVAL_LABEL, value: {{ .approvalLabel | quote }}}
- {name: EPHEMERA_POLICY_REAPPROVE_ON_PUSH, value: {{ .reapproveOnPush | quote }}}
{{- end }}
{{- end -}}
