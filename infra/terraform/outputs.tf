output "cluster_name" {
  description = "The EKS cluster's name."
  value       = module.eks.cluster_name
}

output "region" {
  description = "The AWS region."
  value       = var.region
}

output "kubeconfig_command" {
  description = "Writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "workdir_bucket" {
  description = "The S3 bucket for workdirs: use workdir: s3://<this>/runs/<name> in configs."
  value       = aws_s3_bucket.workdirs.bucket
}

output "ray_role_arn" {
  description = "IAM role of the Ray pods' service account (workdir bucket only)."
  value       = module.ray_irsa.iam_role_arn
}

output "teacher_api_key_secret" {
  description = "The Secrets Manager secret to put the teacher's API key in (aws secretsmanager put-secret-value)."
  value       = aws_secretsmanager_secret.teacher_api_key.name
}

# The values the cluster/kuberay manifests take, as shell exports:
#   eval "$(terraform -chdir=infra/terraform output -raw manifest_env)"
#   envsubst < cluster/kuberay/raycluster.yaml | kubectl apply -f -
output "manifest_env" {
  description = "Shell exports that fill the $${VAR} placeholders of cluster/kuberay/*.yaml (eval it, then envsubst)."
  value = join("\n", [
    "export RAY_NAMESPACE=${var.ray_namespace}",
    "export RAY_SERVICE_ACCOUNT=${var.ray_service_account}",
    "export WORKDIR_BUCKET=${aws_s3_bucket.workdirs.bucket}",
    "export AWS_REGION=${var.region}",
    "export GPU_MAX_NODES=${var.gpu_nodes.max}",
    "export DISTILL_IMAGE=${var.image}",
    "export TEACHER_API_KEY_ENV=${var.teacher_api_key_env}",
  ])
}
