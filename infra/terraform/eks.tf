# EKS with two managed node groups: CPU (Ray head, CPU workers, operators) and GPU (Ray GPU workers,
# tainted so that only pods that ask for GPUs land there). Pods get AWS access through IRSA.
module "eks" {
  #checkov:skip=CKV_TF_1:Pinned to one exact registry release (not a range); a commit hash needs a git source, which loses the registry version that upgrades are reviewed against.
  source  = "terraform-aws-modules/eks/aws"
  version = "20.31.6"

  cluster_name    = var.name
  cluster_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  cluster_endpoint_private_access      = true
  cluster_endpoint_public_access       = length(var.admin_cidrs) > 0
  cluster_endpoint_public_access_cidrs = var.admin_cidrs

  enable_irsa                              = true
  enable_cluster_creator_admin_permissions = true
  cluster_enabled_log_types                = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  # Kubernetes secrets (the teacher's key among them) are envelope-encrypted with this key.
  create_kms_key = false
  cluster_encryption_config = {
    provider_key_arn = aws_kms_key.main.arn
    resources        = ["secrets"]
  }

  cluster_addons = {
    coredns                = {}
    kube-proxy             = {}
    vpc-cni                = {}
    eks-pod-identity-agent = {}
  }

  eks_managed_node_groups = {
    cpu = {
      instance_types = var.cpu_instance_types
      ami_type       = "AL2023_x86_64_STANDARD"
      min_size       = var.cpu_nodes.min
      desired_size   = var.cpu_nodes.desired
      max_size       = var.cpu_nodes.max
      labels         = { "distill-ray/pool" = "cpu" }
      block_device_mappings = {
        root = {
          device_name = "/dev/xvda"
          ebs         = { volume_size = 100, volume_type = "gp3", encrypted = true, kms_key_id = aws_kms_key.main.arn }
        }
      }
      metadata_options = { http_tokens = "required", http_put_response_hop_limit = 1 }
    }

    gpu = {
      instance_types = [var.gpu_instance_type]
      ami_type       = "AL2023_x86_64_NVIDIA" # NVIDIA driver and container toolkit preinstalled
      min_size       = var.gpu_nodes.min
      desired_size   = var.gpu_nodes.desired
      max_size       = var.gpu_nodes.max
      labels         = { "distill-ray/pool" = "gpu" }
      taints = {
        gpu = { key = "nvidia.com/gpu", value = "true", effect = "NO_SCHEDULE" }
      }
      block_device_mappings = {
        root = {
          device_name = "/dev/xvda"
          ebs         = { volume_size = var.gpu_disk_gb, volume_type = "gp3", encrypted = true, kms_key_id = aws_kms_key.main.arn }
        }
      }
      metadata_options = { http_tokens = "required", http_put_response_hop_limit = 1 }
    }
  }
}
