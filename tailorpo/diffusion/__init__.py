"""The one place that touches diffusers and peft: loading pipelines, LoRA on the UNet, the policy."""
