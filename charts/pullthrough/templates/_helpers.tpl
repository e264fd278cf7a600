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
{{- define "pullthrough.credentialsName" -}}{{ include "pullthrough.fullname" . }}-upstream-credentials{{- end -}}
{{- define "pullthrough.baseConfigName" -}}{{ include "pullthrough.fullname" . }}-proxy-base{{- end -}}
{{- define "pullthrough.revertName" -}}{{ include "pullthrough.fullname" . }}-agent-revert{{- end -}}

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
priorityClassName: {{ .Values.agent.priorityClassName }}
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
