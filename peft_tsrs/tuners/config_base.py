"""The fields and checks shared by the RLRR and PACE configs (PEFT's conventions for tuner configs)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from peft.config import PeftConfig

from .tuners_utils import check_adapter_folder, check_saved_version, weights_digest


@dataclass
class TunerConfigBase(PeftConfig):
    """PEFT's targeting fields, ``modules_to_save``, the optional ``tsrs`` training recipe and the version stamp.

    Subclasses call :meth:`_post_init_common` from ``__post_init__``.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "nn.Linear modules to adapt (list of names/suffixes or a regex)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to adapt (list of names/suffixes or a regex)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the block list, used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. ['classifier']."}
    )
    regularizers: Optional[dict] = field(
        default=None, metadata={"help": "Training recipe (RegularizerConfig fields) saved with the adapter."}
    )
    tsrs: Optional[dict] = field(
        default=None, metadata={"help": "Deprecated name of `regularizers` (still read from older adapter folders)."}
    )
    peft_tsrs_version: Optional[str] = field(
        default=None, metadata={"help": "peft-tsrs version that wrote the adapter (set automatically)."}
    )
    weights_sha256: Optional[str] = field(
        default=None,
        metadata={"help": "Content hash of the adapter tensors, written by save_pretrained and checked at load "
                          "(set automatically)."},
    )

    def _post_init_common(self, method: str, list_fields: tuple[str, ...] = ()) -> None:
        """Lists become sets (PEFT convention), ``layers_pattern`` needs ``layers_to_transform``, a ``regularizers``
        recipe object is stored as its dict (so it lands in adapter_config.json without the tuner importing the
        trainer side; the deprecated ``tsrs`` field moves there), and the stored version is checked."""
        self._check_finite_floats(method)
        for name in ("target_modules", "exclude_modules", *list_fields):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{method}: `layers_pattern` only makes sense together with `layers_to_transform`.")
        if self.tsrs is not None:
            if self.regularizers is None:
                self.regularizers = self.tsrs
            self.tsrs = None
        if self.regularizers is not None and not isinstance(self.regularizers, dict):
            to_dict = getattr(self.regularizers, "to_dict", None)
            if to_dict is None:
                raise TypeError(f"{method}: `regularizers` must be a RegularizerConfig or a dict of its fields.")
            self.regularizers = to_dict()
        self.peft_tsrs_version = check_saved_version(self.peft_tsrs_version, method)

    def _check_finite_floats(self, method: str) -> None:
        """Every float field must be finite: NaN or ±inf (also read from a JSON file) is refused, naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{method}: `{f.name}` must be a finite number, got {value!r}.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """As PEFT's, recording the content hash of the weights file next to it, so a load can tell damaged tensor data
        from the saved one.

        Only ``PeftModel.save_pretrained`` writes the weights first and then the config (it is the caller that passes
        ``auto_mapping_dict``). transformers' ``model.save_pretrained`` (a model with ``add_adapter``) and a direct
        call write the config first or alone, so a weights file already in the folder may be the previous save's:
        its hash would make the folder look corrupted once the new weights are written. No hash is recorded then
        (loading such a folder checks that the weights exist, parse and are finite, as for folders without one)."""
        written_first = "auto_mapping_dict" in kwargs and os.path.isdir(save_directory)
        self.weights_sha256 = weights_digest(save_directory) if written_first else None
        super().save_pretrained(save_directory, **kwargs)

    def _check_saved_tensors(self, names: set[str], path: str) -> None:
        """Method-specific checks of the tensor names in a weights file (before anything is loaded)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """As PEFT's, then, for a local folder and before PEFT injects anything into a model: the weights file must
        exist, parse, match the content hash recorded at save time and hold finite values (see
        :func:`~peft_tsrs.tuners.tuners_utils.check_adapter_folder`), so a failed ``PeftModel.from_pretrained`` leaves
        the base model untouched."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        local = os.path.isdir(folder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if local:
            tensors = check_adapter_folder(folder, getattr(config, "weights_sha256", None))
            if isinstance(config, TunerConfigBase):
                config._check_saved_tensors(set(tensors), folder)
        return config
