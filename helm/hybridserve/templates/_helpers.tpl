{{/* Standard names and labels. */}}
{{- define "hybridserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hybridserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hybridserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hybridserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hybridserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hybridserve.labels" -}}
helm.sh/chart: {{ include "hybridserve.chart" . }}
{{ include "hybridserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hybridserve
{{- end }}

{{/* Labels of one component: hybridserve.componentLabels (dict "ctx" . "component" "x") */}}
{{- define "hybridserve.componentLabels" -}}
{{ include "hybridserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "hybridserve.componentSelector" -}}
{{ include "hybridserve.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "hybridserve.image" -}}
{{- $flavor := ternary "gpu" "cpu" .Values.ray.gpuWorkers.enabled -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag) }}
{{- end }}

{{- define "hybridserve.adminSecret" -}}
{{- if .Values.admin.existingSecret }}{{ .Values.admin.existingSecret }}
{{- else if .Values.admin.key }}{{ include "hybridserve.fullname" . }}-admin
{{- else }}{{ required "admin.existingSecret (a Secret with the admin key under `admin-key`; make a key with `hybridserve admin generate-key`) or admin.key is required" "" }}
{{- end }}
{{- end }}

{{- define "hybridserve.databaseSecret" -}}
{{- if .Values.postgresql.enabled }}{{ include "hybridserve.fullname" . }}-database
{{- else }}{{ required "postgresql.externalSecret (a Secret with the tenancy store's URL under `url`) is required when postgresql.enabled is false" .Values.postgresql.externalSecret }}
{{- end }}
{{- end }}

{{- define "hybridserve.grpcAddress" -}}
{{ include "hybridserve.fullname" . }}-grpc:{{ .Values.service.port }}
{{- end }}

{{/* "true" when the OpenAI-compatible HTTP API runs (`openai` in config.serve.apps), else
"". Only then does the chart open Serve's HTTP port to clients (the Service's `http` port,
the NetworkPolicy's client rule, the Ingress). */}}
{{- define "hybridserve.httpApi" -}}
{{- if has "openai" (default (list) .Values.config.serve.apps) }}true{{ end }}
{{- end }}

{{/* The OpenAI-compatible API's Serve route prefix (topology.OPENAI.route_prefix()), where
OpenAI's clients look: base URL http://host:port/v1. */}}
{{- define "hybridserve.openaiRoutePrefix" -}}
/v1
{{- end }}

{{/* The platform config the Serve apps receive: .Values.config plus what the chart runs.
NOTE: never a credential: the RayService shows this config to anyone who may read it
(credentials reach the pods as environment variables from Secrets). */}}
{{- define "hybridserve.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $w := deepCopy (default (dict) $cfg.weaviate) -}}
{{- if $w.api_key -}}
{{- fail "config.weaviate.api_key would be shown in the RayService's Serve config: put the key in a Secret and set weaviate.existingSecret" -}}
{{- end -}}
{{- if not $w.url -}}
{{- if .Values.weaviate.enabled -}}
{{- $_ := set $w "url" (printf "http://%s-weaviate:8080" (include "hybridserve.fullname" .)) -}}
{{- else -}}
{{- $_ := set $w "url" (required "weaviate.externalUrl is required when weaviate.enabled is false" .Values.weaviate.externalUrl) -}}
{{- end -}}
{{- end -}}
{{- if regexMatch "^[a-z]+://[^/]*@" $w.url -}}
{{- fail "the Weaviate URL must not hold credentials (they would be shown in the RayService's Serve config): put the API key in a Secret and set weaviate.existingSecret" -}}
{{- end -}}
{{- $_ := set $cfg "weaviate" $w -}}
{{- $t := default (dict) $cfg.tenancy -}}
{{- if $t.database_url -}}
{{- fail "config.tenancy.database_url would be shown in the RayService's Serve config: the chart passes the database URL from a Secret (postgresql.externalSecret)" -}}
{{- end -}}
{{- if and $t.redis_url (regexMatch "^[a-z]+://[^/]*@" $t.redis_url) -}}
{{- fail "config.tenancy.redis_url holds credentials, which would be shown in the RayService's Serve config: put the URL in a Secret and set redis.existingSecret" -}}
{{- end -}}
{{- $s := deepCopy $cfg.serve -}}
{{- /* The control plane runs where the admin key is: the head pod. */ -}}
{{- if not $s.admin_resources -}}
{{- $_ := set $s "admin_resources" (dict "hybridserve_admin" 0.01) -}}
{{- end -}}
{{- $_ := set $cfg "serve" $s -}}
{{- toJson $cfg -}}
{{- end }}

{{/* serveConfigV2: what `hybridserve serve-config` prints for the same config. */}}
{{- define "hybridserve.serveConfig" -}}
{{- $cfg := include "hybridserve.config" . | fromJson -}}
{{- $serve := default (dict) $cfg.serve -}}
{{- $apps := prepend (required "config.serve.apps is required" $serve.apps) "admin" -}}
{{- $timeout := default 300.0 $serve.request_timeout_s -}}
{{- $out := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" $serve.grpc_host "port" $serve.http_port "request_timeout_s" $timeout)
  "grpc_options" (dict "port" $serve.grpc_port "request_timeout_s" $timeout "grpc_servicer_functions" (list
    "hybridserve.serve_patches.add_to_proxy"
    "hybridserve.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server"
    "hybridserve.v1.retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server"
    "hybridserve.v1.rerank_pb2_grpc.add_RerankServiceServicer_to_server"
    "hybridserve.v1.admin_pb2_grpc.add_AdminServiceServicer_to_server"
    "hybridserve.v1.rag_pb2_grpc.add_RagServiceServicer_to_server"
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"))
-}}
{{- $list := list -}}
{{- range $apps -}}
{{- /* NOTE: as topology.App.route_prefix: a gRPC app at /<name> (Serve's gRPC proxy routes
only to apps with a route prefix), the OpenAI-compatible HTTP app at its own prefix. */ -}}
{{- $prefix := ternary (include "hybridserve.openaiRoutePrefix" $) (printf "/%s" .) (eq . "openai") -}}
{{- $list = append $list (dict "name" . "route_prefix" $prefix "import_path" (printf "hybridserve.app:%s_app" .) "args" (dict "config" $cfg)) -}}
{{- end -}}
{{- $_ := set $out "applications" $list -}}
{{- toYaml $out -}}
{{- end }}

{{/* Secrets of the platform's stores. */}}
{{- define "hybridserve.weaviateSecret" -}}
{{- if .Values.weaviate.existingSecret }}{{ .Values.weaviate.existingSecret }}
{{- else if .Values.weaviate.enabled }}{{ include "hybridserve.fullname" . }}-weaviate
{{- end }}
{{- end }}

{{- define "hybridserve.redisSecret" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecret }}
{{- else if or .Values.redis.enabled .Values.redis.externalUrl }}{{ include "hybridserve.fullname" . }}-redis
{{- end }}
{{- end }}

{{/* A pod's securityContext: hybridserve.podSecurity (dict "uid" 1000 "gid" 100) */}}
{{- define "hybridserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .gid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* A container's securityContext: hybridserve.containerSecurity (dict "readOnly" true) */}}
{{- define "hybridserve.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* Env every Ray pod gets: the stores' credentials (from Secrets, never through the
Serve config) and Serve's transport settings. The admin key is the head's alone. */}}
{{- define "hybridserve.platformEnv" -}}
{{- $t := default (dict) .ctx.Values.config.tenancy }}
{{- $w := default (dict) .ctx.Values.config.weaviate }}
{{- if .head }}
# Only the control plane (AdminService, pinned to this pod) reads it: it registers its digest.
- name: {{ default "HYBRIDSERVE_ADMIN_KEY" $t.admin_key_env }}
  valueFrom:
    secretKeyRef: {name: {{ include "hybridserve.adminSecret" .ctx }}, key: admin-key}
{{- end }}
- name: {{ default "HYBRIDSERVE_DATABASE_URL" $t.database_url_env }}
  valueFrom:
    secretKeyRef: {name: {{ include "hybridserve.databaseSecret" .ctx }}, key: url}
{{- with include "hybridserve.redisSecret" .ctx }}
- name: {{ default "HYBRIDSERVE_REDIS_URL" $t.redis_url_env }}
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: url}
{{- end }}
{{- with include "hybridserve.weaviateSecret" .ctx }}
- name: {{ default "HYBRIDSERVE_WEAVIATE_API_KEY" $w.api_key_env }}
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: api-key}
{{- end }}
{{- with .ctx }}
- name: RAY_SERVE_PROXY_USE_GRPC
  value: {{ ternary "1" "0" (ne (dig "serve" "proxy_grpc_transport" true .Values.config) false) | quote }}
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: {{ ternary "0" "1" (ne (dig "serve" "user_code_on_replica_loop" true .Values.config) false) | quote }}
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: {{ ternary "0" "1" (ne (dig "serve" "router_on_caller_loop" true .Values.config) false) | quote }}
{{- /* The proxy's message size limit and its guard (hybridserve.proxy_guard). */}}
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ int (dig "serve" "max_message_bytes" 4194304 .Values.config) | toString | quote }}
- name: HYBRIDSERVE_PROXY_MAX_KEYLESS
  value: {{ int (dig "serve" "max_keyless_requests" 32 .Values.config) | toString | quote }}
- name: HYBRIDSERVE_PROXY_MAX_PER_CONNECTION
  value: {{ int (dig "serve" "max_requests_per_connection" 256 .Values.config) | toString | quote }}
- name: HYBRIDSERVE_HEALTH_WATCH_S
  value: {{ float64 (dig "serve" "health_watch_s" 30.0 .Values.config) | toString | quote }}
- name: HYBRIDSERVE_HEALTH_POLL_S
  value: {{ float64 (dig "serve" "health_poll_s" 2.0 .Values.config) | toString | quote }}
{{- end }}
{{- end }}

{{/* An egress rule to the Kubernetes API server (networkPolicy.apiServer*). */}}
{{- define "hybridserve.apiServerEgress" -}}
{{- with .Values.networkPolicy.apiServerCidrs }}
to:
  {{- range . }}
  - ipBlock: {cidr: {{ . | quote }}}
  {{- end }}
{{- end }}
ports:
  {{- range .Values.networkPolicy.apiServerPorts }}
  - {port: {{ . }}, protocol: TCP}
  {{- end }}
{{- end }}
