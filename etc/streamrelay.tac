# Run with:  STREAMRELAY_CONFIG=etc/routes.yml twistd -ny etc/streamrelay.tac
#
# The same service the twistd plugin builds, as a .tac file, so it can be
# composed with other Twisted services in one application.
import os

from twisted.application.service import Application

from streamrelay import load_config, make_service

application = Application("streamrelay")
config = load_config(os.environ.get("STREAMRELAY_CONFIG", "routes.yml"))
make_service(config).setServiceParent(application)
