"""What trains: heads (estimators and torch modules), fine-tuning, the epoch loop, distributed training."""
