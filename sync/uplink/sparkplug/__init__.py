"""The Sparkplug B 3.0 edge node, an uplink beside the JSON topics (docs/sparkplug.md).

`node`: the connection, births, deaths and data (the Sink); `replay`: the changes kept while
not born and republished as history; `commands`: DCMD writes; the model it announces is
sync/sparkplug/model.py.
"""
