"""Integrations with other libraries, each imported only when used (``tensor_peft.integrations.transformers``)."""
