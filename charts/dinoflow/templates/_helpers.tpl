{{/* Names */}}
{{- define "dinoflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dinoflow.fullname" -}}
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

{{- define "dinoflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dinoflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dinoflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dinoflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dinoflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dinoflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dinoflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Images: an immutable tag, the chart's appVersion by default. */}}
{{- define "dinoflow.image" -}}
{{- $img := index .root.Values.image .kind -}}
{{- $default := ternary (printf "%s-cuda" .root.Chart.AppVersion) .root.Chart.AppVersion (eq .kind "cuda") -}}
{{- printf "%s:%s" $img.repository (default $default $img.tag) -}}
{{- end -}}

{{/* Object store */}}
{{- define "dinoflow.secretName" -}}
{{- if .Values.objectStore.existingSecret -}}
{{- .Values.objectStore.existingSecret -}}
{{- else -}}
{{- printf "%s-s3" (include "dinoflow.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "dinoflow.minioName" -}}
{{- printf "%s-minio" (include "dinoflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* MinIO's root credentials (keys root_user, root_password): never the object-store Secret. */}}
{{- define "dinoflow.minioRootSecretName" -}}
{{- default (printf "%s-root" (include "dinoflow.minioName" .)) .Values.minio.existingRootSecret -}}
{{- end -}}

{{/* The buckets the chart's pipelines use: objectStore.bucket and the datasets' bucket (data.prefix),
     as a JSON list; the MinIO setup hook creates them and scopes the pipelines' policy to them. */}}
{{- define "dinoflow.buckets" -}}
{{- $data := regexReplaceAll "^s3://([^/]+).*$" (include "dinoflow.dataPrefix" .) "${1}" -}}
{{- list .Values.objectStore.bucket $data | uniq | toJson -}}
{{- end -}}

{{- define "dinoflow.s3Endpoint" -}}
{{- if .Values.objectStore.endpoint -}}
{{- .Values.objectStore.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "dinoflow.minioName" .) .Release.Namespace -}}
{{- else if not .Values.objectStore.existingSecret -}}
{{- fail "objectStore.endpoint is empty: set it to your S3 endpoint (http(s)://host:port), set minio.enabled=true, or name an existingSecret that holds it" -}}
{{- end -}}
{{- end -}}

{{- define "dinoflow.pushgatewayName" -}}
{{- printf "%s-pushgateway" (include "dinoflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dinoflow.pushgatewayUrl" -}}
{{- if .Values.metrics.pushgateway.externalUrl -}}
{{- .Values.metrics.pushgateway.externalUrl -}}
{{- else if .Values.metrics.pushgateway.enabled -}}
{{- printf "http://%s.%s.svc:9091" (include "dinoflow.pushgatewayName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Where raw datasets live (`dinoflow upload --to`), and the one the pipelines ingest by default. */}}
{{- define "dinoflow.dataPrefix" -}}
{{- default (printf "s3://%s/raw" .Values.objectStore.bucket) .Values.data.prefix | trimSuffix "/" -}}
{{- end -}}

{{/* The env every dinoflow container gets: the object store, credentials only by secretKeyRef
     (none with workload identity: the pod's ServiceAccount identity gives them). */}}
{{- define "dinoflow.env" -}}
- name: DINOFLOW_S3_ENDPOINT
  valueFrom:
    secretKeyRef:
      name: {{ include "dinoflow.secretName" . }}
      key: endpoint
{{- with .Values.objectStore.region }}
- name: DINOFLOW_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- if not .Values.objectStore.workloadIdentity }}
- name: DINOFLOW_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dinoflow.secretName" . }}
      key: access_key
- name: DINOFLOW_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dinoflow.secretName" . }}
      key: secret_key
{{- end }}
{{- with (include "dinoflow.pushgatewayUrl" .) }}
- name: DINOFLOW_PUSHGATEWAY
  value: {{ . | quote }}
{{- end }}
- name: DINOFLOW_CONFIG
  value: /etc/dinoflow/dinoflow.yaml
{{- end -}}

{{/* Checks that need more than the JSON schema; they fail `helm template` with one clear line. */}}
{{- define "dinoflow.validate" -}}
{{- if and (not .Values.objectStore.existingSecret) (not .Values.objectStore.workloadIdentity) (or (not .Values.objectStore.accessKey) (not .Values.objectStore.secretKey)) -}}
{{- fail "objectStore: set existingSecret, or both accessKey and secretKey (the chart then creates the Secret), or workloadIdentity=true" -}}
{{- end -}}
{{- if and .Values.objectStore.workloadIdentity (or .Values.objectStore.accessKey .Values.objectStore.secretKey) -}}
{{- fail "objectStore: workloadIdentity=true takes no accessKey/secretKey (the pods' identity gives the credentials)" -}}
{{- end -}}
{{- if and .Values.minio.enabled .Values.objectStore.workloadIdentity -}}
{{- fail "minio.enabled: the in-cluster MinIO needs the pipelines' keys (objectStore accessKey/secretKey or existingSecret), not workloadIdentity" -}}
{{- end -}}
{{- if and .Values.minio.enabled (eq .Values.minio.existingRootSecret (include "dinoflow.secretName" .)) -}}
{{- fail "minio.existingRootSecret names the object-store Secret: MinIO's root must not be the pipelines' user; give it a Secret of its own (keys root_user, root_password)" -}}
{{- end -}}
{{- if and .Values.minio.enabled .Values.objectStore.secretKey (lt (len .Values.objectStore.secretKey) 8) -}}
{{- fail "objectStore.secretKey: MinIO needs at least 8 characters" -}}
{{- end -}}
{{- $tag := default .Chart.AppVersion .Values.image.cpu.tag -}}
{{- if or (eq $tag "latest") (eq (default .Chart.AppVersion .Values.image.cuda.tag) "latest") -}}
{{- fail "image tags must be immutable: 'latest' makes KFP reuse stale cached steps; use a version tag" -}}
{{- end -}}
{{- end -}}

{{/* Pipeline parameters set from the values (names of the pipelines' parameters: the defaults of
     the uploaded pipelines, and the scheduled retrain's arguments). */}}
{{- define "dinoflow.runParameters" -}}
output_root: {{ printf "s3://%s/runs" .Values.objectStore.bucket }}
registry_uri: {{ printf "s3://%s/registry" .Values.objectStore.bucket }}
source_uri: {{ printf "%s/%s" (include "dinoflow.dataPrefix" .) .Values.data.dataset }}
s3_secret_name: {{ include "dinoflow.secretName" . }}
gpus: {{ .Values.gpuPool.gpusPerNode }}
nodes: {{ .Values.gpuPool.numNodes }}
trainjob_config_map: {{ printf "%s-trainjob" (include "dinoflow.fullname" .) }}
gpu_node_selector: {{ toJson .Values.gpuPool.nodeSelector }}
gpu_tolerations: {{ toJson .Values.gpuPool.tolerations }}
{{- range $k, $v := .Values.schedule.parameters }}
{{ $k }}: {{ toJson $v }}
{{- end }}
{{- end -}}

{{/* A container of the hook Job: `dinoflow publish` (every pipeline, customised with the ConfigMap)
     or `dinoflow schedule` (the retrain's recurring run, its version customised the same way). */}}
{{- define "dinoflow.hookContainer" -}}
{{- $root := .root -}}
- name: {{ .name }}
  image: {{ include "dinoflow.image" (dict "root" $root "kind" "cpu") }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args:
    - {{ .name }}
    - --host
    - {{ $root.Values.kfp.host | quote }}
    - --config
    - /etc/dinoflow/dinoflow.yaml
    {{- if eq .name "schedule" }}
    - --cron
    - {{ $root.Values.schedule.cron | quote }}
    - --name
    - {{ $root.Values.kfp.pipelineName | quote }}
    - --experiment
    - {{ $root.Values.kfp.experiment | quote }}
    - --max-concurrency
    - {{ $root.Values.schedule.maxConcurrency | quote }}
    - {{ ternary "--catchup" "--no-catchup" $root.Values.schedule.catchup }}
    - --service-account
    - {{ default (include "dinoflow.serviceAccountName" $root) $root.Values.kfp.runServiceAccount | quote }}
    {{- range $k, $v := (include "dinoflow.runParameters" $root | fromYaml) }}
    - --param
    - {{ printf "%s=%s" $k (ternary $v (toJson $v) (kindIs "string" $v)) | quote }}
    {{- end }}
    {{- range $root.Values.hook.extraArgs }}
    - {{ . | quote }}
    {{- end }}
    {{- end }}
  env:
    {{- include "dinoflow.env" $root | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $root.Values.hook.resources | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/dinoflow
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end -}}
