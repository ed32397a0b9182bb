# IAM roles for service accounts (IRSA): each Kubernetes service account gets one role, trusted only
# through the cluster's OIDC provider and only for that namespace/name.

# The Ray pods (head, workers, RayJob submitter): the workdir bucket, nothing else.
module "ray_irsa" {
  #checkov:skip=CKV_TF_1:Pinned to one exact registry release (not a range); a commit hash needs a git source, which loses the registry version that upgrades are reviewed against.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.48.0"

  role_name = "${var.name}-ray"
  role_policy_arns = {
    workdirs = aws_iam_policy.workdirs.arn
  }
  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["${var.ray_namespace}:${var.ray_service_account}"]
    }
  }
}

resource "aws_iam_policy" "workdirs" {
  name        = "${var.name}-workdirs"
  description = "Read and write the distill-ray workdir bucket, and use its KMS key for it."
  policy      = data.aws_iam_policy_document.workdirs.json
}

data "aws_iam_policy_document" "workdirs" {
  statement {
    sid       = "ListTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.workdirs.arn]
  }
  statement {
    sid       = "ReadWriteObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.workdirs.arn}/*"]
  }
  statement {
    sid       = "UseTheKeyThroughS3Only"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

# The External Secrets Operator: read the teacher's key, nothing else.
module "external_secrets_irsa" {
  #checkov:skip=CKV_TF_1:Pinned to one exact registry release (not a range); a commit hash needs a git source, which loses the registry version that upgrades are reviewed against.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.48.0"

  role_name = "${var.name}-external-secrets"
  role_policy_arns = {
    teacher_key = aws_iam_policy.read_teacher_key.arn
  }
  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["external-secrets:external-secrets"]
    }
  }
}

resource "aws_iam_policy" "read_teacher_key" {
  name        = "${var.name}-read-teacher-key"
  description = "Read the teacher API key secret (for the External Secrets Operator)."
  policy      = data.aws_iam_policy_document.read_teacher_key.json
}

data "aws_iam_policy_document" "read_teacher_key" {
  statement {
    sid       = "ReadTheSecret"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_secretsmanager_secret.teacher_api_key.arn]
  }
  statement {
    sid       = "DecryptItThroughSecretsManagerOnly"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${var.region}.amazonaws.com"]
    }
  }
}
