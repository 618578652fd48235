{{- define "ephemera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "ephemera.labels" -}}
app.kubernetes.io/name: ephemera
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ephemera.selector" -}}
app.kubernetes.io/name: ephemera
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
