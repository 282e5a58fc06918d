{{/*
Public helpers: put the pool-monitor sidecar into any pod (helm/README.md, "Add the sidecar to
your own service"). Each takes a scope: this chart's root context, or, from a chart that
depends on this one, (dict "Values" .Values.poolMonitor "Release" .Release). They read only
`.Values` and `.Release`.

  pool-monitor.sidecar.podLabels     pod label the PodMonitor selects
  pool-monitor.app.command           `command:` items that clear stale snapshots, then exec `args`
  pool-monitor.app.env               `env:` items: POOL_MONITOR_SNAPSHOT_DIR
  pool-monitor.app.volumeMounts      `volumeMounts:` items of the app container (read-write)
  pool-monitor.sidecar.container     `containers:` item: the sidecar (volume read-only, probes,
                                     POOL_MONITOR_TRACE_URL_TEMPLATE from sidecar.traceUrlTemplate)
  pool-monitor.sidecar.volumes       `volumes:` items: snapshots emptyDir, DSN and token Secrets
*/}}

{{- define "pool-monitor.sidecar.podLabels" -}}
pool-monitor/sidecar: {{ include "pool-monitor.fullname" . }}
{{- end -}}

{{/*
The snapshot volume outlives a container restart (it lives as long as the pod), so the app
removes the files of its previous run before it starts; then `exec` runs the container's
`args` as the main process. The sidecar keeps what it had already read in memory, so no
counter goes down. Only pool-monitor's own file names are touched.
*/}}
{{- define "pool-monitor.app.command" -}}
{{- $dir := .Values.snapshots.mountPath -}}
- /bin/sh
- -c
- 'rm -f -- {{ $dir }}/pool-monitor-*.json {{ $dir }}/.pool-monitor-*.json.tmp {{ $dir }}/pool-monitor-*.live {{ $dir }}/.pool-monitor-*.live.tmp {{ $dir }}/pool-monitor-*.board; exec "$@"'
- pool-monitor-start
{{- end -}}

{{- define "pool-monitor.app.env" -}}
- name: POOL_MONITOR_SNAPSHOT_DIR
  value: {{ .Values.snapshots.mountPath | quote }}
{{- end -}}

{{- define "pool-monitor.app.volumeMounts" -}}
- name: pool-monitor-snapshots
  mountPath: {{ .Values.snapshots.mountPath }}
{{- end -}}

{{- define "pool-monitor.sidecar.container" -}}
{{- $sc := .Values.sidecar -}}
{{- $dsn := include "pool-monitor.sidecar.dsnRef" . | fromJson -}}
{{- $token := include "pool-monitor.sidecar.tokenRef" . | fromJson -}}
- name: pool-monitor
  image: {{ include "pool-monitor.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - pool-monitor
    - sidecar
  args:
    - --snapshot-dir={{ .Values.snapshots.mountPath }}
    - --listen=0.0.0.0:{{ $sc.port }}
    - --log-level={{ $sc.logLevel }}
    {{- if $dsn.name }}
    - --postgres-dsn-file=/etc/pool-monitor/postgres/dsn
    - --postgres-interval={{ $sc.postgres.interval }}
    {{- end }}
    {{- if $token.name }}
    - --auth-token-file=/etc/pool-monitor/api-token/token
    {{- else if $sc.insecureApi }}
    - --insecure-api
    {{- end }}
    {{- if $sc.showQueryText }}
    - --show-query-text
    {{- end }}
    {{- range $sc.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  {{- if or $sc.traceUrlTemplate $sc.extraEnv }}
  env:
    {{- with $sc.traceUrlTemplate }}
    - name: POOL_MONITOR_TRACE_URL_TEMPLATE
      value: {{ . | quote }}
    {{- end }}
    {{- with $sc.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - name: pool-monitor
      containerPort: {{ $sc.port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: pool-monitor
    {{- with $sc.livenessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: pool-monitor
    {{- with $sc.readinessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $sc.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: pool-monitor-snapshots
      mountPath: {{ .Values.snapshots.mountPath }}
      readOnly: true
    {{- if $dsn.name }}
    - name: pool-monitor-postgres-dsn
      mountPath: /etc/pool-monitor/postgres
      readOnly: true
    {{- end }}
    {{- if $token.name }}
    - name: pool-monitor-api-token
      mountPath: /etc/pool-monitor/api-token
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
Secret files are mode 0444: they are mounted only into the sidecar container, and must be
readable whatever uid it runs as and whether or not the pod sets an fsGroup.
*/}}
{{- define "pool-monitor.sidecar.volumes" -}}
{{- $dsn := include "pool-monitor.sidecar.dsnRef" . | fromJson -}}
{{- $token := include "pool-monitor.sidecar.tokenRef" . | fromJson -}}
- name: pool-monitor-snapshots
  emptyDir:
    {{- with .Values.snapshots.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.snapshots.sizeLimit | quote }}
{{- if $dsn.name }}
- name: pool-monitor-postgres-dsn
  secret:
    secretName: {{ $dsn.name }}
    defaultMode: 0444
    items:
      - key: {{ $dsn.key }}
        path: dsn
{{- end }}
{{- if $token.name }}
- name: pool-monitor-api-token
  secret:
    secretName: {{ $token.name }}
    defaultMode: 0444
    items:
      - key: {{ $token.key }}
        path: token
{{- end }}
{{- end -}}
