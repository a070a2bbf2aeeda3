"""The standard northbound interfaces: parties that send a site power targets in a standard
other than rampd's own dispatch (NVIDIA DSX Flex, OpenADR 3.1). Each is optional in the site
file and runs as a task of the daemon; what it receives becomes the level of its rail
(`controller.market.rails`: `Rails.set_ceiling`), below the grid dispatch and above
commitments, peaks and price.
"""
