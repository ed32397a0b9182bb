locals {
  workdir_bucket = coalesce(var.workdir_bucket_name, "${var.name}-workdirs-${data.aws_caller_identity.current.account_id}")
}

# Workdirs: prompts, teacher answers (paid for: versioned, so an overwrite is never a loss),
# filtered rows, student checkpoints, eval reports, serve logs.
resource "aws_s3_bucket" "workdirs" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage for artifacts that can be rebuilt from the source logs; the paid-for teacher answers are protected by versioning instead.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events: the pipeline reads manifests, it does not react to uploads.
  #checkov:skip=CKV_AWS_18:Access logging needs a second bucket that would itself need logging; data events are audited by CloudTrail in the account, and every access is by the one IRSA role.
  bucket = local.workdir_bucket
}

resource "aws_s3_bucket_public_access_block" "workdirs" {
  bucket                  = aws_s3_bucket.workdirs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "workdirs" {
  bucket = aws_s3_bucket.workdirs.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs at all
  }
}

resource "aws_s3_bucket_versioning" "workdirs" {
  bucket = aws_s3_bucket.workdirs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "workdirs" {
  bucket = aws_s3_bucket.workdirs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.main.arn
    }
    bucket_key_enabled = true # one KMS call per object batch, not per object: cheaper for many small cache objects
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "workdirs" {
  bucket     = aws_s3_bucket.workdirs.id
  depends_on = [aws_s3_bucket_versioning.workdirs]

  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "expire-scratch"
    status = "Enabled"
    filter {
      prefix = "tmp/"
    }
    expiration {
      days = var.scratch_prefix_days
    }
  }

  rule {
    id     = "archive-checkpoints"
    status = "Enabled"
    filter {
      prefix = "runs/"
    }
    transition {
      days          = 90
      storage_class = "STANDARD_IA"
    }
  }
}

# TLS only.
resource "aws_s3_bucket_policy" "workdirs" {
  bucket     = aws_s3_bucket.workdirs.id
  policy     = data.aws_iam_policy_document.workdirs_tls_only.json
  depends_on = [aws_s3_bucket_public_access_block.workdirs]
}

data "aws_iam_policy_document" "workdirs_tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.workdirs.arn, "${aws_s3_bucket.workdirs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
