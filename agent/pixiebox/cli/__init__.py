"""The command line: `pixiebox serve | check | machines | enroll | power | lab | doctor | demo`
(`main`), the API client it talks through (`client`), and the appliance image's start-up step
(`appliance`: `python -m pixiebox.cli.appliance prepare`).

May import every other package; nothing imports `cli.main`.
"""
