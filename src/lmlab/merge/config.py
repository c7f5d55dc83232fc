"""What to merge and how: a ``MergeSpec``, from command-line options or a mergekit-style YAML file.

The YAML is mergekit's format, for the methods lmlab has::

    merge_method: ties                # linear | slerp | task_arithmetic | ties | dare_ties | dare_linear
    base_model: path/to/base
    models:
      - model: path/to/a
        parameters: {weight: 0.7, density: 0.5}
      - model: path/to/b
        parameters:
          weight: [0.2, 0.8]          # a gradient over the layers: 0.2 at the first, 0.8 at the last
          density: [{filter: mlp, value: 0.3}, {value: 0.6}]   # by tensor name: first filter that matches
    parameters: {lambda: 1.0, normalize: true}    # shared ones (t, lambda, normalize, rescale)
    dtype: float32                    # the dtype the arithmetic reads the inputs in
    out_dtype: bfloat16               # the dtype written
    tokenizer_source: base            # vocabularies of different size: keep the base's

A parameter's value is resolved per tensor as mergekit does: a model's own ``parameters`` first,
then the top-level ones; a list of numbers is a gradient, interpolated at the tensor's layer
fraction (layer i of n sits at i / (n - 1); embeddings, final norm and head at 0); a list of
``{filter, value}`` picks the first whose filter is a substring of the tensor name (or has no filter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.merge.methods import FAMILY

# method -> (shared parameters with defaults; per-input parameters with defaults (None: required);
#            base: "none" | "required")
METHODS: dict[str, dict] = {
    "linear": {"shared": {"normalize": True}, "per_input": {"weight": None}, "base": "none"},
    "slerp": {"shared": {"t": None}, "per_input": {}, "base": "required"},
}
for _name, _how in FAMILY.items():
    METHODS[_name] = {
        "shared": {"normalize": _how.normalize, "rescale": _how.rescale, "lambda": 1.0, "int8_mask": False},
        "per_input": {"weight": None, "density": 1.0},
        "base": "required",
    }
CLI_NAMES = {m.replace("_", "-"): m for m in METHODS}  # task-arithmetic, dare-ties... on the command line
BOOL_PARAMS = {"normalize", "rescale", "int8_mask"}
YAML_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
MODEL_KEYS = {"model", "parameters"}


def method_name(name: str) -> str:
    """The method's canonical (mergekit) name from what the user typed."""
    key = str(name).strip().lower()
    if key in METHODS:
        return key
    if key in CLI_NAMES:
        return CLI_NAMES[key]
    raise LmlabError(
        f"unknown merge method {name!r}; lmlab has {', '.join(CLI_NAMES)} (mergekit's names with underscores work too)."
    )


@dataclass
class ModelEntry:
    model: str
    params: dict = field(default_factory=dict)  # name -> setting (scalar, gradient list or filters)


@dataclass
class MergeSpec:
    method: str
    models: list[ModelEntry]
    base: str | None = None
    params: dict = field(default_factory=dict)  # shared settings, and per-input ones for every model
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # None | "base"

    # -- structure

    @property
    def base_index(self) -> int | None:
        """Index of the base in ``inputs()`` (None for methods without one)."""
        if METHODS[self.method]["base"] == "none":
            return None
        names = [m.model for m in self.inputs()]
        return names.index(self.base)

    def inputs(self) -> list[ModelEntry]:
        """Every model read, in order: the listed ones, then the base if it is not among them (as mergekit)."""
        listed = list(self.models)
        if self.base is not None and METHODS[self.method]["base"] != "none":
            if all(m.model != self.base for m in listed):
                listed.append(ModelEntry(self.base))
        return listed

    def to_dict(self) -> dict:
        """The spec as mergekit YAML would hold it (recorded with the run, written next to the model)."""
        d: dict = {"merge_method": self.method}
        if self.base is not None:
            d["base_model"] = self.base
        d["models"] = [{"model": m.model, **({"parameters": m.params} if m.params else {})} for m in self.models]
        if self.params:
            d["parameters"] = dict(self.params)
        for k in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def validate(self) -> None:
        """Refuse a spec the method cannot run, in one sentence naming the fix."""
        info = METHODS[self.method]
        if not self.models:
            raise LmlabError("no models to merge; name at least two (or list them under models: in the YAML).")
        if info["base"] == "required" and self.base is None:
            raise LmlabError(f"{self.method} needs a base model; pass --base MODEL (base_model: in the YAML).")
        if info["base"] == "none" and self.base is not None and all(m.model != self.base for m in self.models):
            raise LmlabError(
                f"{self.method} takes no base model; drop --base {self.base} (or list it among the models)."
            )
        n = len(self.inputs())
        if self.method == "slerp" and n != 2:
            raise LmlabError(f"slerp interpolates exactly two models (a base and one other); {n} were given.")
        if n < 2:
            raise LmlabError(f"{self.method} needs at least two models; {n} {'was' if n == 1 else 'were'} given.")
        known = set(info["shared"]) | set(info["per_input"])
        for where, settings in [("parameters", self.params)] + [(m.model, m.params) for m in self.models]:
            unknown = sorted(set(settings) - known)
            if unknown:
                raise LmlabError(
                    f"{self.method} has no parameter {unknown[0]!r} (in {where}); its parameters are "
                    f"{', '.join(sorted(known))}."
                )
        shared_in_model = [(m.model, k) for m in self.models for k in m.params if k in info["shared"]]
        if shared_in_model:
            who, k = shared_in_model[0]
            raise LmlabError(f"{k!r} is shared by all models; set it in the top-level parameters, not under {who}.")
        for k in info["per_input"]:
            if info["per_input"][k] is None:
                for m in self._takers():
                    if k not in m.params and k not in self.params:
                        raise LmlabError(
                            f"{self.method} needs a {k} for every model and {m.model} has none; "
                            f"pass --{k}s (or parameters: {{{k}: ...}} in the YAML)."
                        )
        for k in info["shared"]:
            if info["shared"][k] is None and k not in self.params:
                raise LmlabError(f"{self.method} needs the parameter {k!r}; pass --{k} (parameters: {{{k}: ...}}).")
        for where, settings in [("parameters", self.params)] + [(m.model, m.params) for m in self.models]:
            for k, setting in settings.items():
                for v in _scalars(setting):
                    _check_value(k, v, where)

    def _takers(self) -> list[ModelEntry]:
        """The models that take per-input parameters (all but the base, for base methods)."""
        bi = self.base_index
        return [m for i, m in enumerate(self.inputs()) if i != bi]

    # -- per tensor

    def shared_values(self, tensor: str, t: float) -> dict:
        info = METHODS[self.method]
        out = {}
        for k, default in info["shared"].items():
            v = resolve_setting(self.params.get(k), tensor, t) if k in self.params else None
            out[k] = default if v is None else v
        return out

    def input_values(self, entry: ModelEntry, tensor: str, t: float) -> dict:
        info = METHODS[self.method]
        out = {}
        for k, default in info["per_input"].items():
            v = None
            for scope in (entry.params, self.params):
                if k in scope:
                    v = resolve_setting(scope[k], tensor, t)
                    if v is not None:
                        break
            if v is None:
                if default is None:
                    raise LmlabError(
                        f"no {k} applies to {entry.model}'s tensor {tensor} (no filter matches it); "
                        "add a catch-all value without a filter."
                    )
                v = default
            out[k] = v
        return out


def _scalars(setting) -> list:
    if isinstance(setting, dict):
        return _scalars(setting.get("value"))
    if isinstance(setting, list):
        return [v for s in setting for v in _scalars(s)]
    return [setting]


def _check_value(name: str, v, where: str) -> None:
    if name in BOOL_PARAMS:
        if not isinstance(v, bool):
            raise LmlabError(f"{name} is true or false, got {v!r} (in {where}).")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise LmlabError(f"{name} must be a number, got {v!r} (in {where}).")
    if v != v or v in (float("inf"), float("-inf")):
        raise LmlabError(f"{name} must be a finite number, got {v!r} (in {where}).")
    if name == "density" and not 0 <= v <= 1:
        raise LmlabError(f"density must be between 0 and 1 (the fraction of each task vector kept), got {v}.")
    if name == "t" and not 0 <= v <= 1:
        raise LmlabError(f"t must be between 0 (the base) and 1 (the other model), got {v}.")


def resolve_setting(setting, tensor: str, t: float):
    """A parameter's value for one tensor (None when no filter matches), as mergekit resolves it."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]  # discrete values step, they do not interpolate
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = pos - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise LmlabError(f"a parameter list mixes values and filters ({setting!r}); use one or the other.")
        f = cond.get("filter")
        if f is None or f == "*" or (tensor and f in tensor):
            return resolve_setting(cond["value"], tensor, t)
    return None


# ----------------------------------------------------------------------------- building a spec


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise LmlabError(f"{what} takes numbers separated by commas (e.g. 0.5,0.5), got {text!r}.") from None


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def spec_from_options(
    models: list[str],
    method: str = "linear",
    *,
    weights: str | list[float] | None = None,
    t: str | float | list[float] | None = None,
    base: str | None = None,
    density: float | None = None,
    lam: float | None = None,
    normalize: bool | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    tokenizer: str | None = None,
) -> MergeSpec:
    """The spec for ``lmlab merge A B [C...] --method ...``.

    The base (slerp's t=0 end; the task-arithmetic family's origin) is --base, else the first model.
    Default weights: 1 for every model that takes one (linear then averages).
    """
    method = method_name(method)
    info = METHODS[method]
    names = [str(m) for m in models]
    if info["base"] == "required" and base is None:
        base = names[0] if names else None
    if base is not None:  # --base ./a and a are one model: name it as the list does
        same = [n for n in names if n != base and _same_path(n, base)]
        base = same[0] if same else base
    entries = [ModelEntry(n) for n in names]
    spec = MergeSpec(method, entries, base=base, dtype=dtype, out_dtype=out_dtype)
    if tokenizer is not None:
        if str(tokenizer).lower() != "base":
            raise LmlabError(f"--tokenizer {tokenizer}: the one way lmlab resolves vocabularies is --tokenizer base.")
        spec.tokenizer_source = "base"
    takers = spec._takers()
    if weights is not None:
        if "weight" not in info["per_input"]:
            raise LmlabError(f"{method} takes no weights; drop --weights (slerp's mix is --t).")
        ws = _parse_floats(weights, "--weights") if not isinstance(weights, list) else list(weights)
        if len(ws) != len(takers):
            who = ", ".join(m.model for m in takers)
            extra = f" (the base {base} takes none)" if info["base"] == "required" else ""
            raise LmlabError(
                f"--weights has {len(ws)} value{'s' if len(ws) != 1 else ''} for {len(takers)} "
                f"model{'s' if len(takers) != 1 else ''} ({who}){extra}; give one weight per model."
            )
        for m, w in zip(takers, ws):
            m.params["weight"] = w
    elif "weight" in info["per_input"]:
        for m in takers:
            m.params["weight"] = 1.0
    if t is not None:
        if method != "slerp":
            raise LmlabError(f"--t is slerp's; {method} mixes by --weights.")
        ts = _parse_floats(t, "--t") if isinstance(t, str) else (list(t) if isinstance(t, list) else [float(t)])
        spec.params["t"] = ts[0] if len(ts) == 1 else ts
    for name, value in (("density", density), ("lambda", lam), ("normalize", normalize)):
        if value is None:
            continue
        if name not in info["shared"] and name not in info["per_input"]:
            raise LmlabError(f"{method} has no {name}; drop --{name}.")
        spec.params[name] = value
    spec.validate()
    return spec


def spec_from_yaml(path) -> MergeSpec:
    """Read a mergekit-style YAML config (see the module docstring); unsupported keys are named."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path} does not exist; pass the merge config YAML file.")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LmlabError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from None
    if not isinstance(d, dict):
        raise LmlabError(f"{path} should hold a mapping with merge_method and models; see `lmlab merge --help`.")
    unknown = sorted(set(d) - YAML_KEYS)
    if unknown:
        more = " (lmlab merges whole models: use models:, not slices:)" if "slices" in unknown else ""
        raise LmlabError(
            f"{path}: lmlab does not support the key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{more}; "
            f"remove {'them' if len(unknown) > 1 else 'it'} (supported: {', '.join(sorted(YAML_KEYS))})."
        )
    if "merge_method" not in d:
        raise LmlabError(f"{path} has no merge_method; add e.g. merge_method: linear.")
    method = method_name(d["merge_method"])
    rows = d.get("models")
    if not isinstance(rows, list) or not rows:
        raise LmlabError(f"{path} has no models: list; add one '- model: NAME' per model.")
    entries = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"model": row}
        if not isinstance(row, dict) or "model" not in row:
            raise LmlabError(f"{path}: models[{i}] has no 'model:'; write '- model: NAME'.")
        bad = sorted(set(row) - MODEL_KEYS)
        if bad:
            raise LmlabError(f"{path}: models[{i}] has the unsupported key {bad[0]!r}; keep model and parameters.")
        params = row.get("parameters") or {}
        if not isinstance(params, dict):
            raise LmlabError(f"{path}: models[{i}].parameters should be a mapping (e.g. {{weight: 0.5}}).")
        entries.append(ModelEntry(str(row["model"]), dict(params)))
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise LmlabError(f"{path}: parameters should be a mapping (e.g. {{t: 0.5}}).")
    tok = d.get("tokenizer_source")
    if tok is not None and str(tok) != "base":
        raise LmlabError(f"{path}: tokenizer_source {tok!r} is not supported; lmlab resolves vocabularies with 'base'.")
    base = d.get("base_model")
    spec = MergeSpec(
        method,
        entries,
        base=str(base) if base is not None else None,
        params=dict(params),
        dtype=d.get("dtype"),
        out_dtype=d.get("out_dtype"),
        tokenizer_source=tok,
    )
    spec.validate()
    return spec
