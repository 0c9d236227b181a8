"""Data for the three stages.

* ``chat_format``: K-EXAONE chat rendering and assistant-only loss masks (token level).
* ``sft``: load, validate, tokenize and split SFT chat datasets.
* ``packing``: pack tokenized samples into rows without cross-sample attention leakage.
* ``prompts``: prompt sets for AGAPO/GROUPER and a seeded, resumable ``PromptCursor``.
* ``tiny_tasks``: the offline tiny task generator used by the CPU pipeline (see its docstring).

Submodules are imported on use, so ``import kexaone_align.data`` stays cheap.
"""
