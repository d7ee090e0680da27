"""The few ``transformers.PreTrainedModel`` methods that tools built on HF pipelines ask of a model
(nnsight's ``TransformersModel`` / ``LanguageModel``): ``can_generate``, ``generation_config``, and
``input_ids=`` keywords on ``forward`` / ``generate`` (see ``HookedLlama.forward``)."""

from __future__ import annotations


class HFSurfaceMixin:
    main_input_name = "input_ids"

    def can_generate(self) -> bool:
        """Always True: a causal LM (transformers' pipelines ask before generating)."""
        return True

    @property
    def generation_config(self):
        """transformers' ``GenerationConfig`` made from this model's config (eos, bos, pad ids)."""
        if "_generation_config" not in self.__dict__:
            from transformers import GenerationConfig

            self.__dict__["_generation_config"] = GenerationConfig.from_model_config(self.config)
        return self.__dict__["_generation_config"]

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.__dict__["_generation_config"] = value
