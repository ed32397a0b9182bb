# The teacher's API key lives in AWS Secrets Manager. Terraform creates the secret but never its
# value (which would then sit in the Terraform state): put it in once with
#   aws secretsmanager put-secret-value --secret-id distill-ray/teacher-api-key --secret-string "$KEY"
# The External Secrets Operator copies it into the Kubernetes secret `teacher-api-key` in the Ray
# namespace, refreshed hourly; the Ray pods see it as $OPENAI_API_KEY (var.teacher_api_key_env).
resource "aws_secretsmanager_secret" "teacher_api_key" {
  #checkov:skip=CKV2_AWS_57:The key is issued by the teacher's vendor; AWS cannot rotate it. Rotate at the vendor and put-secret-value; pods pick it up within the refresh interval.
  name                    = var.teacher_api_key_secret_name
  description             = "API key of the teacher LLM for distill-ray (value set out of band, never by Terraform)."
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = 7
}
