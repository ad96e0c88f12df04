"""`lora_sweep` entry point: LoRA rank sweep with parent/child runs (see `python entrypoints/lora_sweep.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import SweepConfig

main = command(SweepConfig, "finetune_lab.lora_sweep:run", name="lora_sweep")

if __name__ == "__main__":
    main()
