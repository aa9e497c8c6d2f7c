"""Model ports. Qwen2.5 is the one DAPO runs on."""
