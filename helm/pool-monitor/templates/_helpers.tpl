{{/*
Names, labels and Secret references.

Helpers marked "scope" read only `.Values` and `.Release`: this chart passes its root context,
a parent chart passes (dict "Values" .Values.poolMonitor "Release" .Release). They never read
`.Chart`, which is the parent's chart in that case, so names come out the same from both.
*/}}

{{/* scope: the name part of resource names. */}}
{{- define "pool-monitor.name" -}}
{{- default "pool-monitor" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* scope: `<release>-pool-monitor`, or the release name if it already contains the name. */}}
{{- define "pool-monitor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pool-monitor.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* root: labels of every object this chart creates. */}}
{{- define "pool-monitor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "pool-monitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pool-monitor
{{- end -}}

{{/* root: selector labels of one component; call with (dict "root" $ "component" "demo"). */}}
{{- define "pool-monitor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pool-monitor.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* scope: the image reference (digest wins over tag). */}}
{{- define "pool-monitor.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (toString $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* scope: name of the Secret this chart creates for the bundled PostgreSQL. */}}
{{- define "pool-monitor.postgresql.secretName" -}}
{{- printf "%s-postgresql" (include "pool-monitor.fullname" .) -}}
{{- end -}}

{{/* scope: host name of the bundled PostgreSQL. */}}
{{- define "pool-monitor.postgresql.host" -}}
{{- printf "%s-postgresql" (include "pool-monitor.fullname" .) -}}
{{- end -}}

{{/*
scope: the app's database URL Secret as JSON {"name", "key"}, or {} when there is none.
The bundled PostgreSQL wins; otherwise database.existingSecret.
*/}}
{{- define "pool-monitor.database.secretRef" -}}
{{- if .Values.postgresql.enabled -}}
{{- dict "name" (include "pool-monitor.postgresql.secretName" .) "key" "dsn" | toJson -}}
{{- else if .Values.database.existingSecret -}}
{{- dict "name" .Values.database.existingSecret "key" .Values.database.secretKey | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* scope: the sidecar's DSN Secret as JSON {"name", "key"}, or {} when it polls no PostgreSQL. */}}
{{- define "pool-monitor.sidecar.dsnRef" -}}
{{- $pg := .Values.sidecar.postgres -}}
{{- if not $pg.enabled -}}
{{- dict | toJson -}}
{{- else if $pg.existingSecret -}}
{{- dict "name" $pg.existingSecret "key" $pg.secretKey | toJson -}}
{{- else -}}
{{- include "pool-monitor.database.secretRef" . -}}
{{- end -}}
{{- end -}}

{{/*
scope: the API token Secret as JSON {"name", "key"}, or {} without a token. `insecureApi`
turns the generated token off (an existing Secret with it is rejected in validate).
*/}}
{{- define "pool-monitor.sidecar.tokenRef" -}}
{{- $token := .Values.sidecar.apiToken -}}
{{- if $token.existingSecret -}}
{{- dict "name" $token.existingSecret "key" $token.secretKey | toJson -}}
{{- else if and $token.create (not .Values.sidecar.insecureApi) -}}
{{- dict "name" (printf "%s-api-token" (include "pool-monitor.fullname" .)) "key" "token" | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* root: name of the demo's ServiceAccount. */}}
{{- define "pool-monitor.demo.serviceAccountName" -}}
{{- if .Values.demo.serviceAccount.create -}}
{{- default (printf "%s-demo" (include "pool-monitor.fullname" .)) .Values.demo.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.demo.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
root: a random value that survives upgrades: the Secret's current value when it exists
(`lookup` sees the cluster at install/upgrade; offline it sees nothing), else a new one.
Call with (dict "root" $ "secret" NAME "key" KEY "length" N).
*/}}
{{- define "pool-monitor.stableRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* root: fail early, with the fix, on combinations the schema cannot express. */}}
{{- define "pool-monitor.validate" -}}
{{- if and .Values.demo.enabled (not .Values.postgresql.enabled) (not .Values.database.existingSecret) -}}
{{- fail "pool-monitor: the demo needs a database: set postgresql.enabled=true (a demo PostgreSQL in the release) or database.existingSecret=<Secret with key \"dsn\" holding postgresql://user:password@host:5432/db>" -}}
{{- end -}}
{{- if and .Values.sidecar.apiToken.existingSecret .Values.sidecar.insecureApi -}}
{{- fail "pool-monitor: sidecar.insecureApi=true contradicts sidecar.apiToken.existingSecret (a token is required then): remove one of them" -}}
{{- end -}}
{{- end -}}
