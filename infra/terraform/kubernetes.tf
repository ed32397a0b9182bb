# What runs inside the cluster: the NVIDIA device plugin, the KubeRay operator, the External Secrets
# Operator, and the Ray namespace with its service account and the teacher's key.

resource "helm_release" "nvidia_device_plugin" {
  name             = "nvidia-device-plugin"
  repository       = "https://nvidia.github.io/k8s-device-plugin"
  chart            = "nvidia-device-plugin"
  version          = var.nvidia_device_plugin_version
  namespace        = "nvidia-device-plugin"
  create_namespace = true

  # Only on GPU nodes, through their taint.
  values = [yamlencode({
    nodeSelector = { "distill-ray/pool" = "gpu" }
    tolerations  = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
  })]

  depends_on = [module.eks]
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_version
  namespace        = "kuberay-operator"
  create_namespace = true

  values = [yamlencode({
    nodeSelector = { "distill-ray/pool" = "cpu" }
  })]

  depends_on = [module.eks]
}

resource "helm_release" "external_secrets" {
  name             = "external-secrets"
  repository       = "https://charts.external-secrets.io"
  chart            = "external-secrets"
  version          = var.external_secrets_version
  namespace        = "external-secrets"
  create_namespace = true

  values = [yamlencode({
    installCRDs  = true
    nodeSelector = { "distill-ray/pool" = "cpu" }
    serviceAccount = {
      name        = "external-secrets"
      annotations = { "eks.amazonaws.com/role-arn" = module.external_secrets_irsa.iam_role_arn }
    }
  })]

  depends_on = [module.eks]
}

resource "kubernetes_namespace" "ray" {
  metadata {
    name = var.ray_namespace
  }
  depends_on = [module.eks]
}

resource "kubernetes_service_account" "ray" {
  metadata {
    name      = var.ray_service_account
    namespace = kubernetes_namespace.ray.metadata[0].name
    annotations = {
      "eks.amazonaws.com/role-arn" = module.ray_irsa.iam_role_arn
    }
  }
}

# A SecretStore and an ExternalSecret, as a local chart: Helm applies custom resources whose CRDs
# the release above installs in the same `terraform apply` (the kubernetes_manifest resource would
# need the CRDs at plan time).
resource "helm_release" "teacher_api_key" {
  name      = "teacher-api-key"
  chart     = "${path.module}/charts/teacher-api-key"
  namespace = kubernetes_namespace.ray.metadata[0].name

  values = [yamlencode({
    region         = var.region
    secretName     = aws_secretsmanager_secret.teacher_api_key.name
    kubernetesName = "teacher-api-key"
    key            = "api-key"
  })]

  depends_on = [helm_release.external_secrets]
}
