from twisted.application.service import ServiceMaker

streamrelay = ServiceMaker(
    "streamrelay",
    "streamrelay.tap",
    "A layer-4 TCP and UDP relay with PROXY protocol support",
    "streamrelay",
)
