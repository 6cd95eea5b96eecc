# What every HI-MoE MMDetection config adds to its detector's runtime (inherit it, do not copy):
# the plugin's modules, routing statistics (train/himoe/*) whenever the logger logs (its interval
# read at run time; the console gets a compact `himoe:` summary, every value goes to the scalars
# file), and checkpoints that torch.load(weights_only=True) and mmdet's publish_model.py read as
# they are.
custom_imports = dict(imports=['himoe_plugin.mmdet'], allow_failed_imports=False)
custom_hooks = [dict(type='RoutingStatisticsHook'), dict(type='WeightsOnlyCheckpointHook')]
