"""The OmegaConf resolvers of coalora's configs, registered on import (by :mod:`coalora.run`
and by :mod:`coalora.pipeline`, which instantiates the callbacks that use them)."""

import os

from omegaconf import OmegaConf

from coalora.data import metric_mode
from coalora.model.hub import package_path

# `${package_path:<package>}`: the folder of an installed offline model package.
OmegaConf.register_new_resolver("package_path", package_path, replace=True)
# `${pid:}`: this process's id, in run folder names (conf/hydra/default.yaml).
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)
# `${metric_mode:${task.metric}}`: whether a metric improves upward (max) or downward (min).
OmegaConf.register_new_resolver("metric_mode", metric_mode, replace=True)
