"""Host-free model code: torch, numpy and safetensors only. Never imports ComfyUI."""
