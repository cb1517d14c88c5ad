"""The `deepen` command line (`cli`) and its commands. The library never imports this
package; it imports only the library.
"""
