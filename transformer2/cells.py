"""The evaluation matrix: the kinds of cell, one (model, task) evaluation each.

One-pass cells answer with fixed weights: the base model, the task's SVF expert, its LoRA
adapter. Two-pass cells are Transformer²'s adaptation strategies over the SVF experts (Table 2).
"""
ONE_PASS_KINDS = ("base", "svf", "lora")
TWO_PASS_KINDS = ("prompt", "classifier", "few_shot")  # names in `strategies.STRATEGIES`
CELL_KINDS = ONE_PASS_KINDS + TWO_PASS_KINDS
KIND_TITLES = {"base": "base", "lora": "LoRA", "svf": "SVF", "prompt": "prompt", "classifier": "classifier",
               "few_shot": "few-shot"}
