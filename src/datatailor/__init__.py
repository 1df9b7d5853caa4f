"""datatailor: tailor instruction-tuning data to a target task and a target model."""

__version__ = "0.1.0"
