variable "region" {
  description = "AWS region for every resource (the EKS cluster, the workdir bucket, the secret)."
  type        = string
  default     = "us-west-2"
}

variable "zone_suffixes" {
  description = "The Availability Zones the VPC spans, as letters after the region (us-west-2 + a = us-west-2a); at least two for EKS, a subnet pair each. Regions or accounts without a, b or c (us-west-1 offers b and c) set their own."
  type        = list(string)
  default     = ["a", "b", "c"]

  validation {
    condition     = length(var.zone_suffixes) >= 2 && alltrue([for s in var.zone_suffixes : can(regex("^[a-z]$", s))])
    error_message = "zone_suffixes: at least two single letters, e.g. [\"a\", \"b\", \"c\"]."
  }
}

variable "name" {
  description = "Name prefix of every resource; also the EKS cluster's name."
  type        = string
  default     = "distill-ray"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name))
    error_message = "name: 3-31 characters, lower-case letters, digits and '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.31"
}

variable "vpc_cidr" {
  description = "CIDR of the new VPC (a private and a public subnet per zone of zone_suffixes are cut from it)."
  type        = string
  default     = "10.40.0.0/16"
}

variable "admin_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint from the internet (your office or VPN). Empty: private endpoint only (then run kubectl from inside the VPC)."
  type        = list(string)
  default     = []
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (Ray head, CPU workers, operators)."
  type        = list(string)
  default     = ["m6i.2xlarge"]
}

variable "cpu_nodes" {
  description = "Size of the CPU node group: min, desired and max nodes."
  type        = object({ min = number, desired = number, max = number })
  default     = { min = 1, desired = 2, max = 6 }
}

variable "gpu_instance_type" {
  description = "Instance type of the GPU node group, e.g. g5.2xlarge (1 A10G), g6e.xlarge (1 L40S), p4d.24xlarge (8 A100)."
  type        = string
  default     = "g5.2xlarge"
}

variable "gpu_nodes" {
  description = "Size of the GPU node group: min, desired and max nodes. min 0 lets the Ray autoscaler scale it to zero."
  type        = object({ min = number, desired = number, max = number })
  default     = { min = 0, desired = 0, max = 4 }
}

variable "gpu_disk_gb" {
  description = "Root volume of each GPU node, in GB (images with CUDA are large; checkpoints are written here before S3)."
  type        = number
  default     = 300
}

variable "ray_namespace" {
  description = "Kubernetes namespace of the Ray clusters, jobs and services."
  type        = string
  default     = "distill-ray"
}

variable "ray_service_account" {
  description = "Kubernetes service account of the Ray pods; its IAM role reaches the workdir bucket only."
  type        = string
  default     = "distill-ray"
}

variable "workdir_bucket_name" {
  description = "Name of the S3 bucket for workdirs. Empty: '<name>-workdirs-<account id>'."
  type        = string
  default     = ""
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted artifact version is kept before it expires."
  type        = number
  default     = 30
}

variable "scratch_prefix_days" {
  description = "Days after which objects under the bucket's 'tmp/' prefix (scratch runs, smoke tests) expire."
  type        = number
  default     = 14
}

variable "teacher_api_key_secret_name" {
  description = "Name of the AWS Secrets Manager secret holding the teacher's API key. Terraform creates it empty; put the value in with `aws secretsmanager put-secret-value` so that it never enters the Terraform state."
  type        = string
  default     = "distill-ray/teacher-api-key"
}

variable "teacher_api_key_env" {
  description = "Environment variable the pods get the teacher's key in: what the config's teachers[].api_key_env names."
  type        = string
  default     = "OPENAI_API_KEY"
}

variable "kuberay_version" {
  description = "Version of the KubeRay operator Helm chart (>= 1.5.1 for Ray token auth through authOptions)."
  type        = string
  default     = "1.5.1"
}

variable "nvidia_device_plugin_version" {
  description = "Version of the NVIDIA device plugin Helm chart (advertises nvidia.com/gpu on GPU nodes)."
  type        = string
  default     = "0.17.1"
}

variable "external_secrets_version" {
  description = "Version of the External Secrets Operator Helm chart (syncs the teacher's key into a Kubernetes secret)."
  type        = string
  default     = "0.14.3"
}

variable "image" {
  description = "Container image of the Ray pods (cluster/Dockerfile: Ray 2.60 with CUDA and distill-ray at /app). Only written into the manifest_env output."
  type        = string
  default     = "rayproject/ray:2.60.0-py311-gpu"
}
