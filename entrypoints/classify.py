"""`classify` entry point: fine-tune a sequence classifier (see `python entrypoints/classify.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import ClassifyConfig

main = command(ClassifyConfig, "finetune_lab.classify:run", name="classify")

if __name__ == "__main__":
    main()
