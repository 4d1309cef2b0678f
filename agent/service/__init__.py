"""Process plumbing shared by the two long-running programs: sd_notify, watchdog, HTTP probe
server, task helpers.
"""
