"""GPT-OSS Mixture-of-Experts pretraining pipeline on DeepSpeed."""
