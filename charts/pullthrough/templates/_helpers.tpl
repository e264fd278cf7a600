{{/*
Prefix of every object name: docs/cluster-contract.md names the objects
<prefix>-proxy, <prefix>-registries, <prefix>-ca, <prefix>-operator,
<prefix>-agent-<node>; the release `pullthrough` gives the prefix `pullthrough`.
*/}}
{{- define "pullthrough.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "pullthrough" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-pullthrough" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pullthrough.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" -}}
{{- end -}}

{{/* Labels on every object; pass (dict "ctx" $ "component" "proxy"). */}}
{{- define "pullthrough.labels" -}}
helm.sh/chart: {{ include "pullthrough.chart" .ctx }}
app.kubernetes.io/name: pullthrough
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: pullthrough
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; pass (dict "ctx" $ "component" "proxy"). */}}
{{- define "pullthrough.selectorLabels" -}}
app.kubernetes.io/name: pullthrough
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* "repository:tag" of an image block; pass (dict "ctx" $ "image" .Values.proxy.image). */}}
{{- define "pullthrough.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .ctx.Chart.AppVersion) -}}
{{- end -}}

{{/* Object names from the contract. */}}
{{- define "pullthrough.proxyName" -}}{{ include "pullthrough.fullname" . }}-proxy{{- end -}}
{{- define "pullthrough.operatorName" -}}{{ include "pullthrough.fullname" . }}-operator{{- end -}}
{{- define "pullthrough.agentName" -}}{{ include "pullthrough.fullname" . }}-agent{{- end -}}
{{- define "pullthrough.tableName" -}}{{ include "pullthrough.fullname" . }}-registries{{- end -}}
{{- define "pullthrough.caName" -}}{{ include "pullthrough.fullname" . }}-ca{{- end -}}
{{- define "pullthrough.pinsName" -}}{{ include "pullthrough.fullname" . }}-pins{{- end -}}
{{- define "pullthrough.credentialsName" -}}{{ include "pullthrough.fullname" . }}-upstream-credentials{{- end -}}
{{- define "pullthrough.baseConfigName" -}}{{ include "pullthrough.fullname" . }}-proxy-base{{- end -}}
{{- define "pullthrough.revertName" -}}{{ include "pullthrough.fullname" . }}-agent-revert{{- end -}}
{{- /* The operator's --discovery. */ -}}
{{- define "pullthrough.discoveryMode" -}}
{{- if not .Values.operator.discovery.enabled }}off{{ else if .Values.operator.discovery.create }}create{{ else }}report{{ end -}}
{{- end -}}
{{- define "pullthrough.discoveryCreateName" -}}{{ include "pullthrough.operatorName" . }}-discovery-create{{- end -}}
{{- define "pullthrough.peersName" -}}{{ include "pullthrough.fullname" . }}-proxy-peers{{- end -}}
{{- define "pullthrough.proxyAdminName" -}}{{ include "pullthrough.fullname" . }}-proxy-admin{{- end -}}

{{/*
The Secret holding the proxy's admin token (key `token`): the admin's own
(proxy.adminToken.existingSecret) or <prefix>-proxy-admin-token. The proxy
and the operator read it as PULLTHROUGH_ADMIN_TOKEN ("pullthrough.adminTokenEnv").
*/}}
{{- define "pullthrough.adminTokenSecret" -}}
{{- .Values.proxy.adminToken.existingSecret | default (printf "%s-proxy-admin-token" (include "pullthrough.fullname" .)) -}}
{{- end -}}
{{/*
Optional: while the Secret does not exist the proxy runs without a token
(admin API off, `/status` lists public tag moves only), as before it.
*/}}
{{- define "pullthrough.adminTokenEnv" -}}
- name: PULLTHROUGH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "pullthrough.adminTokenSecret" . }}
      key: token
      optional: true
{{- end -}}

{{/*
The proxy's admin port (/metrics, /status, /readyz) stays inside the
cluster: on a ClusterIP proxy Service it is one of its ports; a
LoadBalancer or NodePort Service would publish it, so the port moves to
the ClusterIP Service <prefix>-proxy-admin, and "pullthrough.proxyAdminUrl"
is its base URL for the operator and the agents (else empty: they read the
port off the proxy Service).
*/}}
{{- define "pullthrough.proxyAdminSeparate" -}}
{{- if ne .Values.proxy.service.type "ClusterIP" }}true{{ end -}}
{{- end -}}
{{- define "pullthrough.proxyAdminUrl" -}}
{{- if include "pullthrough.proxyAdminSeparate" . -}}
http://{{ include "pullthrough.proxyAdminName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:9090
{{- end -}}
{{- end -}}

{{/* Where the proxy reads the bucket's access keys and its CA bundle. */}}
{{- define "pullthrough.s3CredentialsDir" -}}/etc/pullthrough/s3{{- end -}}
{{- define "pullthrough.s3CaDir" -}}/etc/pullthrough/s3-ca{{- end -}}

{{/*
Settings the values schema cannot check because they span several values;
each failure says what to set. Included (for its failures only) by the
proxy Deployment.
*/}}
{{- define "pullthrough.validateProxy" -}}
{{- $p := .Values.proxy -}}
{{- $s3 := $p.storage.s3.bucket -}}
{{- $replicas := int $p.replicas -}}
{{- if and (gt $replicas 1) (eq $p.cache.type "pvc") (not (has "ReadWriteMany" $p.cache.accessModes)) -}}
{{- if $s3 -}}
{{- fail (printf "proxy.replicas=%d over S3 would share one %s cache volume, which only one node can mount: set proxy.cache.type: emptyDir (each replica keeps its own local tier in front of the bucket; bound it with proxy.cache.maxSize below proxy.cache.emptyDirSizeLimit)" $replicas (join "/" $p.cache.accessModes)) -}}
{{- else -}}
{{- fail (printf "proxy.replicas=%d would share one %s cache volume, which only one node can mount. Run the replicas over a shared bucket: set proxy.storage.s3.bucket (and its credentials, see the chart's README) with proxy.cache.type: emptyDir; or set proxy.cache.accessModes to [ReadWriteMany] (a shared file system); or proxy.replicas: 1" $replicas (join "/" $p.cache.accessModes)) -}}
{{- end -}}
{{- end -}}
{{- if $s3 -}}
{{- if gt (float64 $p.storage.lowWatermark) (float64 $p.storage.highWatermark) -}}
{{- fail (printf "proxy.storage.lowWatermark (%v) must not exceed proxy.storage.highWatermark (%v)" $p.storage.lowWatermark $p.storage.highWatermark) -}}
{{- end -}}
{{- if and (hasPrefix "http://" $p.storage.s3.endpoint) (not $p.storage.s3.allowHttp) -}}
{{- fail (printf "proxy.storage.s3.endpoint %s is plain HTTP: use https://, or set proxy.storage.s3.allowHttp: true (the bucket's content and access keys then travel unencrypted)" $p.storage.s3.endpoint) -}}
{{- end -}}
{{- if has (int $p.peers.port) (list (int $p.ports.https) (int $p.ports.http) (int $p.ports.admin)) -}}
{{- fail (printf "proxy.peers.port %d is already one of proxy.ports: choose another port" (int $p.peers.port)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Registries serving pullthrough's own images: nodes must pull them without
the proxy, so they are never DNS-hijacked (the first path segment of each
image repository when it looks like a host, else docker.io).
*/}}
{{- define "pullthrough.ownRegistries" -}}
{{- $hosts := list -}}
{{- range (list .Values.operator.image .Values.proxy.image .Values.agent.image .Values.agent.revertOnUninstall.pauseImage .Values.agent.revertOnUninstall.kubectlImage) -}}
{{- $first := first (splitList "/" .repository) -}}
{{- if and (gt (len (splitList "/" .repository)) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $hosts = append $hosts $first -}}
{{- else -}}
{{- $hosts = append $hosts "docker.io" -}}
{{- end -}}
{{- end -}}
{{- $hosts | uniq | sortAlpha | join "," -}}
{{- end -}}

{{/* The proxy's own DNS names (Service short and qualified names, extras). */}}
{{- define "pullthrough.proxyNames" -}}
{{- $svc := include "pullthrough.proxyName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- concat $names .Values.proxy.extraNames | toJson -}}
{{- end -}}

{{/* Pod-level security for the non-root components. */}}
{{- define "pullthrough.podSecurityNonRoot" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
# Volumes (the proxy's cache) are re-owned only when their root is not
# already 65532's: a recursive chown of a full cache at every start took
# minutes.
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security for the non-root components. */}}
{{- define "pullthrough.containerSecurityNonRoot" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The node-agent's pod settings shared by the DaemonSet and the revert hook. */}}
{{- define "pullthrough.agentPodCommon" -}}
hostPID: true
{{- with .Values.agent.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.agent.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.agent.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.agent.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Container security of the node-agent: privileged, root (it edits the host). */}}
{{- define "pullthrough.agentSecurity" -}}
privileged: true
runAsUser: 0
readOnlyRootFilesystem: true
{{- end -}}

{{- define "pullthrough.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}


{{/*
The spec of a ResourceQuota that admits the agent's priority class in the
release namespace (GKE refuses pods of system-node-critical outside
kube-system unless one matches); the bound is nominal.
*/}}
{{- define "pullthrough.criticalPodsQuotaSpec" -}}
hard:
  pods: "1G"
scopeSelector:
  matchExpressions:
    - scopeName: PriorityClass
      operator: In
      values: [{{ .Values.agent.priorityClassName | quote }}]
{{- end -}}

{{- /*
A hook Job's identity: ServiceAccount, ClusterRole with `rules` (a YAML
string), and their binding, all hooks of `hook` (pre-delete, ...) at
weight -10, gone once they succeed. Args: dict "ctx" . "name" "component"
"hook" "rules".
*/ -}}
{{- define "pullthrough.hookClusterIdentity" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "pullthrough.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  annotations:
    helm.sh/hook: {{ .hook }}
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ .name }}
  labels:
    {{- include "pullthrough.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  annotations:
    helm.sh/hook: {{ .hook }}
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
rules:
{{- .rules | trim | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .name }}
  labels:
    {{- include "pullthrough.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  annotations:
    helm.sh/hook: {{ .hook }}
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ .ctx.Release.Namespace }}
{{- end -}}

