"""The gateway daemon (`edge-agent run`): runtime, reload, devices and pollers, pipeline,
health, metrics.
"""
