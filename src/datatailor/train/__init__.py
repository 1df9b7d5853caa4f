"""Fine-tuning: supervised fine-tuning with TRL + PEFT (`sft`). Heavy imports happen inside the functions."""

from datatailor._callable_package import make_callable  # noqa: E402

make_callable(__name__)  # dt.train(...) calls datatailor.api.train
