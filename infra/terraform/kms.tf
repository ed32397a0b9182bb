# One customer-managed key for the workdir bucket, the teacher's secret, EKS secrets and node volumes.
resource "aws_kms_key" "main" {
  description             = "${var.name}: workdirs, the teacher API key, EKS secrets and node volumes"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's resource "*" is this key only. The account-root statement is AWS's default key policy: it hands use of the key to IAM policies, which are scoped (iam.tf).
  #checkov:skip=CKV_AWS_111:Same: a key policy, resource "*" means this key; writes are granted per role by the IAM policies in iam.tf, each with a kms:ViaService condition.
  #checkov:skip=CKV_AWS_356:Same: in a key policy "*" cannot name any other resource than the key it is attached to.
  # The account administers the key (the AWS default); use is granted by IAM policies below.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  # EC2 Auto Scaling launches the node groups' encrypted volumes with this key.
  statement {
    sid       = "AutoScalingUsesKeyForVolumes"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey", "kms:CreateGrant"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"]
    }
  }
}
