"""Each job's config as Hydra composes it, at a fraction of the cost, for sweeps of many jobs.

Hydra composes a job's config from its overrides in two steps (`ConfigLoaderImpl.
_load_configuration_impl`): the overrides that choose configs of groups (`model=resnet18`,
`+experiment=x`, `~metric`) build the defaults list, whose configs are loaded and merged; the other
overrides (`seed=3`, `method.n_steps=20`, `+x=1`) are then applied to the merged config, in order.
The first step costs tens to hundreds of milliseconds a job; the second well under one. A sweep over
seeds, parameters or images has few distinct sets of group choices and many jobs, so `JobComposer`
runs the first step once per distinct set of choices and only the second step per job, and fills in
the fields that Hydra derives from a job's overrides (`hydra.overrides.task` and `.hydra`,
`hydra.job.override_dirname`). A test holds the result to Hydra's own `load_sweep_config`, job by
job, field by field.
"""

from __future__ import annotations

import pickle

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict


class JobComposer:
    """Composes the jobs of a sweep like `loader.load_sweep_config(master, overrides)`.

    Args:
        loader: Hydra's config loader (the sweeper's `hydra_context.config_loader`).
        master: the sweep's config (the sweeper's `config`).
    """

    def __init__(self, loader: ConfigLoaderImpl, master: DictConfig) -> None:
        self.loader, self.master = loader, master
        self.parser = OverridesParser.create(config_loader=loader)
        master_hydra = OmegaConf.to_container(master.hydra.overrides.hydra)
        assert isinstance(master_hydra, list)
        self.master_hydra: list[str] = [str(o) for o in master_hydra]
        # Which keys name config groups: Hydra's own repository, with the search path the sweep's
        # overrides give it (as `_load_configuration_impl` builds it).
        _, self.repo = loader._parse_overrides_and_create_caching_repo(
            master.hydra.job.config_name, self.master_hydra
        )
        self._parsed: dict[str, Override] = {}
        self._choice: dict[str, bool] = {}
        self._bases: dict[tuple[str, ...], bytes] = {}
        self._reads_hydra: dict[tuple[str, ...], bool] = {}

    def _parse(self, line: str) -> Override:
        if line not in self._parsed:
            (self._parsed[line],) = self.parser.parse_overrides([line])
        return self._parsed[line]

    def _chooses(self, override: Override) -> bool:
        """Whether Hydra reads the override as a group choice (`Overrides.__init__` in Hydra's
        defaults list): the key is a config group and the value is not a dict.
        """
        line = str(override.input_line)
        if line not in self._choice:
            group = self.repo.group_exists(override.key_or_group)
            self._choice[line] = group and not isinstance(override.value(), dict)
        return self._choice[line]

    def _base(self, parsed: list[Override]) -> tuple[tuple[str, ...], bytes]:
        """The config composed from the group choices among `parsed` alone, once per distinct set,
        pickled: unpickling a copy for each job takes a third of the time of `copy.deepcopy`.
        """
        choices = tuple(str(o.input_line) for o in parsed if self._chooses(o))
        if choices not in self._bases:
            base = self.loader.load_sweep_config(self.master, list(choices))
            task = OmegaConf.masked_copy(base, [str(k) for k in base if k != "hydra"])
            self._bases[choices] = pickle.dumps(base)
            self._reads_hydra[choices] = "${hydra:" in OmegaConf.to_yaml(task)
        return choices, self._bases[choices]

    def reads_hydra(self, overrides: list[str]) -> bool:
        """Whether the job's task config may read the `hydra` node through `${hydra:...}`: then
        resolving it needs `HydraConfig` set to the job's config, as Hydra's launchers do.
        """
        choices, _ = self._base([self._parse(line) for line in overrides])
        return self._reads_hydra[choices] or any("${hydra:" in line for line in overrides)

    def compose(self, overrides: list[str]) -> DictConfig:
        """The job's config, as `load_sweep_config` would compose it."""
        parsed = [self._parse(line) for line in overrides]
        _, base = self._base(parsed)
        cfg = pickle.loads(base)
        ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if not self._chooses(o)], cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        node = cfg.hydra
        with open_dict(node):
            node.overrides.task = [str(o.input_line) for o in task]
            node.overrides.hydra = self.master_hydra + [
                str(o.input_line) for o in parsed if o.is_hydra_override()
            ]
            dirname = node.job.config.override_dirname
            node.job.override_dirname = get_overrides_dirname(
                overrides=task,
                kv_sep=dirname.kv_sep,
                item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys,
            )
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg
