"""kexaone-align: K-EXAONE's SFT -> AGAPO -> GROUPER post-training recipe on the full MoE policy."""

__version__ = "0.1.0"
