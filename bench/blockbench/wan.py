"""stub"""
SCENARIO = "wan"
WAN_PARTS = ("throughput", "compression", "catchup")


def add_args(g):
    pass


def main_wan(args):
    return 0
