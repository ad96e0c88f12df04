"""`generate` entry point: answer a prompt with a registered model (see `python entrypoints/generate.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import GenerateConfig

main = command(GenerateConfig, "finetune_lab.generate:run", name="generate")

if __name__ == "__main__":
    main()
