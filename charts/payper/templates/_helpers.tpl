{{/* Names, labels and shared snippets of the payper chart. */}}

{{- define "payper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "payper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "payper.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "payper.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* payper.component: the name of one component, e.g. (include "payper.component" (list . "operator")) */}}
{{- define "payper.component" -}}
{{- printf "%s-%s" (include "payper.fullname" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "payper.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "payper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: payper
{{- end -}}

{{/* payper.selectorLabels: (list . "operator") */}}
{{- define "payper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "payper.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* payper.componentLabels: (list . "operator") */}}
{{- define "payper.componentLabels" -}}
{{ include "payper.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "payper.image" -}}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "payper.operatorService" -}}
{{- printf "%s.%s.svc" (include "payper.component" (list . "operator")) .Release.Namespace -}}
{{- end -}}

{{/* The agent's namespace: its own, since it alone needs the privileged Pod Security level. */}}
{{- define "payper.agentNamespace" -}}
{{- default (printf "%s-agent" .Release.Namespace) .Values.agent.namespace.name -}}
{{- end -}}

{{/* The operator's CA for the agent, in the agent's namespace (a Secret of another namespace cannot be mounted). */}}
{{- define "payper.agentCaConfigMap" -}}
{{- printf "%s-ca" (include "payper.component" (list . "operator")) -}}
{{- end -}}

{{- define "payper.tlsSecret" -}}
{{- default (printf "%s-tls" (include "payper.component" (list . "operator"))) .Values.operator.tls.existingSecret -}}
{{- end -}}

{{/* Restricted Pod Security: what every container without host access gets. */}}
{{- define "payper.restrictedContainerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "payper.restrictedPodSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A projected ServiceAccount token for the operator's audience, and the operator's CA. */}}
{{/* payper.identityVolumes: (list . "gateway"): the agent reads the CA from its own namespace's ConfigMap. */}}
{{- define "payper.identityVolumes" -}}
{{- $root := index . 0 -}}
- name: operator-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ $root.Values.tokenAudience }}
          expirationSeconds: 3600
- name: operator-ca
{{- if eq (index . 1) "agent" }}
  configMap:
    name: {{ include "payper.agentCaConfigMap" $root }}
{{- else }}
  secret:
    secretName: {{ include "payper.tlsSecret" $root }}
{{- end }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end -}}

{{- define "payper.identityMounts" -}}
- name: operator-token
  mountPath: /var/run/secrets/payper
  readOnly: true
- name: operator-ca
  mountPath: /etc/payper/ca
  readOnly: true
{{- end -}}
